#!/bin/bash
# User data for the EKS node group's launch template (Amazon Linux 2023 EKS AMI), run once
# at boot before the node joins: install the Nitro Enclaves CLI, reserve CPUs and huge-page
# memory for the enclaves in /etc/nitro_enclaves/allocator.yaml, start the allocator.
# The launch template must also enable enclaves (EnclaveOptions Enabled=true) and the node
# group must label its nodes aws-nitro-enclaves-k8s-dp=enabled (docs/SCALE_OUT.md).
set -euo pipefail

# Enclaves on this node (the device plugin advertises up to 4) and what each one gets:
# 2 vCPUs (whole cores) and 1024 MiB (deploy/lesion-fleet.yaml's nitro-cli --memory).
ENCLAVES=${ENCLAVES:-4}
CPUS_PER_ENCLAVE=2
MEMORY_MIB_PER_ENCLAVE=1024

dnf install -y aws-nitro-enclaves-cli jq
cat > /etc/nitro_enclaves/allocator.yaml <<YAML
---
# Written by deploy/node-setup.sh: ${ENCLAVES} enclaves x ${MEMORY_MIB_PER_ENCLAVE} MiB, x ${CPUS_PER_ENCLAVE} vCPUs
memory_mib: $((ENCLAVES * MEMORY_MIB_PER_ENCLAVE))
cpu_count: $((ENCLAVES * CPUS_PER_ENCLAVE))
YAML
systemctl enable --now nitro-enclaves-allocator.service
# The kubelet advertises huge pages as it finds them when it starts: if it already runs,
# restart it so it sees the pages the allocator just reserved.
if systemctl is-active --quiet kubelet; then
    systemctl restart kubelet
fi
