"""Which authentic attestation documents we accept: PCR sets, debug mode, freshness.

The policy fails closed: a policy names the enclave images it accepts, and a policy that
names none accepts nothing. Accepting any enclave image must be asked for in code, with
:meth:`AttestationPolicy.any_enclave` (insecure: for tests and explicit ``--insecure``
style flags); there is no file form for it.

JSON format (``AttestationPolicy.from_json_file``)::

    {
      "allowed_pcrs": [
        {"PCR0": "<96 hex>", "PCR1": "<96 hex>", "PCR2": "<96 hex>", "PCR8": "<96 hex, optional>"}
      ],
      "allow_debug": false,
      "max_age_seconds": 600
    }

- ``allowed_pcrs``: one or more sets, required; a document is accepted if *every* PCR
  named in *some* set equals the document's value. Each set must name PCR0, PCR1 and PCR2
  (the image, the kernel/bootstrap and the application, per the Nitro Enclaves user guide),
  taken from the output of ``nitro-cli build-enclave``; other PCRs (typically PCR8, the
  signing certificate) are optional. A missing or empty list is an error, and so is an
  all-zero PCR0/1/2 (what debug-mode enclaves report) unless ``allow_debug`` is true.
- ``allow_debug``: accept enclaves started with ``--debug-mode`` (all-zero PCR0/1/2).
  Never set this in production: a debug enclave's console is readable by the parent.
- ``max_age_seconds``: reject documents whose timestamp is older than this at verification
  time (and more than ``MAX_CLOCK_SKEW`` in the future). Omitted or null: no age check.

The output of ``nitro-cli build-enclave`` (``{"Measurements": {"HashAlgorithm": ...,
"PCR0": ..., "PCR1": ..., "PCR2": ...}}``) is also accepted as-is: it becomes one allowed set.

Unknown keys are refused, so a typo ("allowed_pcr") cannot silently change what is accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from nitrolesion.attestation.errors import InvalidPolicy
from nitrolesion.limits import PCR_LENGTH

# The NSM has 32 PCRs (0..31); 0..15 are reported in every document.
MAX_PCR_INDEX = 31
# PCRs that identify the enclave image; every allowed set must pin them.
REQUIRED_PCRS = (0, 1, 2)
# Tolerated clock difference between the NSM and the verifier for "from the future" checks.
MAX_CLOCK_SKEW = timedelta(minutes=5)

# Where the values of a policy file come from; named in every "no PCRs" error.
PCR_SOURCE_HINT = (
    "give the PCR0, PCR1 and PCR2 values printed by `nitro-cli build-enclave` "
    "(or pass that output file itself as the policy)"
)

_PCR_KEY = re.compile(r"^PCR([0-9]{1,2})$")
_TOP_LEVEL_KEYS = frozenset({"allowed_pcrs", "allow_debug", "max_age_seconds"})


@dataclass(frozen=True)
class AttestationPolicy:
    """What the verifier accepts once a document is known to be authentic.

    Attributes:
        allowed_pcr_sets: sets of ``{pcr_index: 48-byte value}``, each naming PCR0, PCR1
            and PCR2; an empty tuple accepts no enclave (unless ``any_pcrs``).
        allow_debug: accept debug-mode enclaves (all-zero PCR0/1/2).
        max_age: maximum age of the document at verification time; ``None`` = no check.
        any_pcrs: accept any PCR values. INSECURE; set it through :meth:`any_enclave` only.

    Raises:
        InvalidPolicy: on construction, if a set is empty, lacks PCR0/1/2, has an all-zero
            PCR0/1/2 without ``allow_debug``, or a PCR index/value is invalid; or if
            ``any_pcrs`` is combined with allowed sets.
    """

    allowed_pcr_sets: tuple[dict[int, bytes], ...] = ()
    allow_debug: bool = False
    max_age: timedelta | None = None
    any_pcrs: bool = False
    # Not part of the equality/hash: a frozen dataclass holding dicts is not hashable anyway.
    _frozen_sets: tuple[tuple[tuple[int, bytes], ...], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.allow_debug, bool):
            raise InvalidPolicy(f"allow_debug: expected bool, got {type(self.allow_debug).__name__}")
        if not isinstance(self.any_pcrs, bool):
            raise InvalidPolicy(f"any_pcrs: expected bool, got {type(self.any_pcrs).__name__}")
        if self.any_pcrs and self.allowed_pcr_sets:
            # Either the PCRs are pinned or they are not; both at once would hide which applies.
            raise InvalidPolicy(
                f"any_pcrs: expected no allowed PCR sets with it, got {len(self.allowed_pcr_sets)}"
            )
        frozen: list[tuple[tuple[int, bytes], ...]] = []
        for number, pcr_set in enumerate(self.allowed_pcr_sets):
            if not isinstance(pcr_set, Mapping) or not pcr_set:
                raise InvalidPolicy(f"allowed PCR set #{number}: expected a non-empty mapping, got {pcr_set!r}")
            for index, value in pcr_set.items():
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_PCR_INDEX:
                    raise InvalidPolicy(f"allowed PCR set #{number}: expected PCR index 0..{MAX_PCR_INDEX}, got {index!r}")
                if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
                    got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
                    raise InvalidPolicy(f"allowed PCR set #{number}, PCR{index}: expected {PCR_LENGTH} bytes, got {got}")
            _check_required_pcrs(pcr_set, f"allowed PCR set #{number}", allow_debug=self.allow_debug)
            frozen.append(tuple(sorted(pcr_set.items())))
        if self.max_age is not None and (not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)):
            raise InvalidPolicy(f"max_age: expected a positive timedelta or None, got {self.max_age!r}")
        # Defensive copies: the caller's dicts may change after the policy was built.
        object.__setattr__(self, "allowed_pcr_sets", tuple(dict(s) for s in frozen))
        object.__setattr__(self, "_frozen_sets", tuple(frozen))

    def matching_pcr_set(self, pcrs: Mapping[int, bytes]) -> int | None:
        """Index of the first allowed set that ``pcrs`` satisfies, or ``None``.

        With no allowed sets, nothing matches (``None``), except for a policy built by
        :meth:`any_enclave`, which every document matches (returns -1).
        """
        if not self._frozen_sets:
            return -1 if self.any_pcrs else None
        for number, pcr_set in enumerate(self._frozen_sets):
            if all(pcrs.get(index) == value for index, value in pcr_set):
                return number
        return None

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def any_enclave(cls, *, max_age: timedelta | None = None, allow_debug: bool = False) -> AttestationPolicy:
        """INSECURE: a policy that accepts any enclave image (PCRs are not checked).

        Only the chain, signature, nonce, freshness and (unless ``allow_debug``) the
        debug-mode check still apply: any code running in any Nitro enclave passes. Meant for
        tests and for explicit ``--insecure``-style flags that say so to the user; a policy
        file cannot express it.
        """
        return cls(allow_debug=allow_debug, max_age=max_age, any_pcrs=True)

    @classmethod
    def for_dev_pcrs(
        cls, pcrs: Mapping[int, bytes], *, max_age: timedelta | None = None
    ) -> AttestationPolicy:
        """A policy pinning PCR0/1/2 (and PCR8 if present and not all-zero) to ``pcrs``.

        Typical use: ``AttestationPolicy.for_dev_pcrs(DevAttestationAuthority.load(...).pcrs)``.

        Raises:
            InvalidPolicy: ``pcrs`` lacks PCR0, PCR1 or PCR2, or one of them is all-zero.
        """
        missing = [i for i in REQUIRED_PCRS if i not in pcrs]
        if missing:
            raise InvalidPolicy(f"expected PCR0, PCR1 and PCR2, got no {', '.join(f'PCR{i}' for i in missing)}")
        pinned = {i: bytes(pcrs[i]) for i in REQUIRED_PCRS}
        if 8 in pcrs and any(pcrs[8]):
            pinned[8] = bytes(pcrs[8])
        return cls(allowed_pcr_sets=(pinned,), max_age=max_age)

    @classmethod
    def from_json_file(cls, path: str | Path) -> AttestationPolicy:
        """Load a policy from a JSON file in the format in this module's docstring.

        Raises:
            InvalidPolicy: unreadable file, invalid JSON, or not the documented format.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidPolicy(f"policy file {path}: expected a readable UTF-8 file, got {exc}") from exc
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # nesting too deep: not a ValueError
            raise InvalidPolicy(f"policy file {path}: expected JSON, got {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> AttestationPolicy:
        """Build a policy from its JSON form (see the module docstring).

        Raises:
            InvalidPolicy: not the documented format.
        """
        if not isinstance(data, dict):
            raise InvalidPolicy(f"policy: expected a JSON object, got {type(data).__name__}")
        if "Measurements" in data:
            # `nitro-cli build-enclave` output: exactly one allowed set.
            return cls(allowed_pcr_sets=(_parse_pcr_set(data["Measurements"], "Measurements", measurements=True),))
        unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
        if unknown:
            raise InvalidPolicy(f"policy: expected keys among {sorted(_TOP_LEVEL_KEYS)}, got unknown {unknown}")
        allow_debug = data.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise InvalidPolicy(f"allow_debug: expected true or false, got {allow_debug!r}")
        raw_age = data.get("max_age_seconds")
        max_age = None
        if raw_age is not None:
            if isinstance(raw_age, bool) or not isinstance(raw_age, (int, float)) or not raw_age > 0:
                raise InvalidPolicy(f"max_age_seconds: expected a positive number or null, got {raw_age!r}")
            try:
                max_age = timedelta(seconds=raw_age)
            except OverflowError as exc:
                raise InvalidPolicy(f"max_age_seconds: expected a representable duration, got {raw_age!r}") from exc
        # Fail closed: a file without PCR sets must not mean "accept any enclave".
        raw_sets = data.get("allowed_pcrs")
        if raw_sets is None:
            raise InvalidPolicy(f"allowed_pcrs: expected a list of PCR sets, got none; {PCR_SOURCE_HINT}")
        if not isinstance(raw_sets, list):
            raise InvalidPolicy(f"allowed_pcrs: expected a list, got {type(raw_sets).__name__}")
        if not raw_sets:
            raise InvalidPolicy(f"allowed_pcrs: expected at least one PCR set, got an empty list; {PCR_SOURCE_HINT}")
        sets = tuple(_parse_pcr_set(raw, f"allowed_pcrs[{n}]") for n, raw in enumerate(raw_sets))
        return cls(allowed_pcr_sets=sets, allow_debug=allow_debug, max_age=max_age)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this policy (inverse of :meth:`from_dict`)."""
        return {
            "allowed_pcrs": [{f"PCR{i}": v.hex() for i, v in sorted(s.items())} for s in self.allowed_pcr_sets],
            "allow_debug": self.allow_debug,
            "max_age_seconds": None if self.max_age is None else self.max_age.total_seconds(),
        }


def _parse_pcr_set(raw: Any, where: str, *, measurements: bool = False) -> dict[int, bytes]:
    if not isinstance(raw, dict):
        raise InvalidPolicy(f"{where}: expected an object of PCRn: hex, got {type(raw).__name__}")
    pcrs: dict[int, bytes] = {}
    for key, value in raw.items():
        if measurements and key == "HashAlgorithm":
            if not str(value).startswith("Sha384"):
                raise InvalidPolicy(f"{where}.HashAlgorithm: expected Sha384, got {value!r}")
            continue
        match = _PCR_KEY.match(key) if isinstance(key, str) else None
        if match is None or int(match.group(1)) > MAX_PCR_INDEX:
            raise InvalidPolicy(f"{where}: expected keys PCR0..PCR{MAX_PCR_INDEX}, got {key!r}")
        if not isinstance(value, str):
            raise InvalidPolicy(f"{where}.{key}: expected a hex string, got {type(value).__name__}")
        try:
            decoded = bytes.fromhex(value)
        except ValueError as exc:
            raise InvalidPolicy(f"{where}.{key}: expected hex, got {value[:20]!r}...") from exc
        if len(decoded) != PCR_LENGTH:
            raise InvalidPolicy(f"{where}.{key}: expected {PCR_LENGTH} bytes ({2 * PCR_LENGTH} hex digits), got {len(decoded)}")
        pcrs[int(match.group(1))] = decoded
    missing = [i for i in REQUIRED_PCRS if i not in pcrs]
    if missing:
        raise InvalidPolicy(
            f"{where}: expected PCR0, PCR1 and PCR2, got no {', '.join(f'PCR{i}' for i in missing)}; {PCR_SOURCE_HINT}"
        )
    return pcrs


def _check_required_pcrs(pcr_set: Mapping[int, bytes], where: str, *, allow_debug: bool) -> None:
    """Every set pins PCR0/1/2; an all-zero one would match any debug-mode enclave."""
    missing = [i for i in REQUIRED_PCRS if i not in pcr_set]
    if missing:
        raise InvalidPolicy(
            f"{where}: expected PCR0, PCR1 and PCR2, got no {', '.join(f'PCR{i}' for i in missing)}; {PCR_SOURCE_HINT}"
        )
    zero = [i for i in REQUIRED_PCRS if not any(pcr_set[i])]
    if zero and not allow_debug:
        raise InvalidPolicy(
            f"{where}: expected measured (non-zero) PCR0, PCR1 and PCR2, got all-zero "
            f"{', '.join(f'PCR{i}' for i in zero)} (what debug-mode enclaves report); "
            f"{PCR_SOURCE_HINT}, or set allow_debug for development"
        )
