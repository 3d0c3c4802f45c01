"""The parent side: the CLI and what its commands use (server, enclave client, classify, demo, images)."""
