"""The compiled scan has no data-dependent branch: checked on the built object's disassembly.

``docs/architecture.md`` ("Checking the compiled scan for branches") describes the check
by hand. In each constant-time kernel of ``keystile._speedups`` (the AVX2, SSE2 and scalar
tag scans and the 32-byte compare) every conditional jump must test only *control*
registers: the array's address and the entry count (the first two arguments, ``%rdi``
and ``%rsi``) and registers computed from them and from constants alone (loop indexes,
end pointers). A tag, a digest byte or anything loaded from
memory is data; a branch on it would make the time depend on where, or whether, a key
matches. Runs where ``objdump`` exists and the CPU is x86-64.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

from hitpaths import COMPILED_AVAILABLE

KERNELS = ("ks_scan_avx2", "ks_scan_sse2", "ks_scan_scalar", "ks_equal32")
#: Control at entry: the array's address (``%rdi``) and the entry count (``%rsi``). An
#: address is not secret; what is loaded from it is.
_ARGUMENTS = ("rdi", "rsi")

pytestmark = [
    pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed"),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 disassembly only"),
]

_ALIASES = {
    **{
        f"{p}{r}": f"r{r}"
        for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")
        for p in ("e", "")
    },
    **{f"{r}l": f"r{r}x" for r in "abcd"},
    "sil": "rsi",
    "dil": "rdi",
}
for _n in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _ALIASES[f"r{_n}{_suffix}"] = f"r{_n}"

#: Instructions whose result in a general register stays control when every register it
#: reads is control (immediates are constants).
_ARITHMETIC = {
    "mov",
    "add",
    "sub",
    "lea",
    "neg",
    "not",
    "xor",
    "and",
    "or",
    "shl",
    "shr",
    "sar",
    "inc",
    "dec",
    "imul",
}
#: Flag setters a loop condition may use.
_COMPARES = {"cmp", "test", "add", "sub", "inc", "dec", "and", "shr", "sar"}
#: Instructions that neither set flags nor write a general register we track.
_NO_FLAGS = re.compile(
    r"^(v?mov\w*|lea|push|pop|nop\w*|xchg|v?p(?!test)\w+|vzeroupper|endbr64|ret|jmp|"
    r"v?punpck\w+|v?pshufd|vbroadcast\w*|vpbroadcast\w*|v?blend\w*|cs|data16|cltq|cqto)$"
)


def _registers(operand_text: str) -> list[str]:
    return [_ALIASES.get(r, r) for r in re.findall(r"%(\w+)", operand_text)]


def _parse(so_path: str, symbol: str) -> list[tuple[int, str, str]]:
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", so_path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2), m.group(3).split("#")[0].strip()))
    return rows


def _writes(mnemonic: str, operands: str) -> str | None:
    """The general register an instruction writes (AT&T: the last operand), if any."""
    if mnemonic in ("cmp", "test", "push", "ret") or mnemonic.startswith("j"):
        return None
    parts = re.split(r",(?![^(]*\))", operands)
    last = parts[-1].strip() if parts and parts[-1] else ""
    regs = _registers(last)
    if len(regs) == 1 and "(" not in last and regs[0].startswith("r"):
        return regs[0]
    return None


def _is_control_write(mnemonic: str, operands: str, control: set[str]) -> bool:
    base = mnemonic.rstrip("qlwb") if mnemonic not in _ARITHMETIC else mnemonic
    if base == "lea":  # address arithmetic, not a load: its registers are its sources
        return all(r in control for r in _registers(operands)[:-1])
    if base not in _ARITHMETIC or "(" in operands:
        return False
    parts = [p.strip() for p in re.split(r",(?![^(]*\))", operands)]
    sources = parts if base not in ("mov", "lea") else parts[:-1]
    if base == "xor" and len(parts) == 2 and _registers(parts[0]) == _registers(parts[1]):
        return True  # zeroing
    return all(r in control for p in sources for r in _registers(p))


def check_kernel(rows: list[tuple[int, str, str]]) -> list[str]:
    """Problems found: conditional jumps whose flags come from data."""
    problems = []
    # Dataflow over the straight-line order, iterated so loop back-edges are merged:
    # the control set at an address is what holds on every path into it.
    entry_state = set(_ARGUMENTS)
    at_target: dict[int, set[str]] = {}
    for _ in range(6):
        state = set(entry_state)
        new_targets: dict[int, set[str]] = {}
        seen_flags: list[tuple[str, str, set[str]]] = []
        problems = []
        for address, mnemonic, operands in rows:
            if address in at_target:
                state &= at_target[address]
            if mnemonic.startswith("j"):
                target = re.match(r"([0-9a-f]+)", operands)
                if target:
                    t = int(target.group(1), 16)
                    new_targets[t] = new_targets.get(t, set(state)) & state
                if mnemonic != "jmp":
                    if not seen_flags:
                        problems.append(f"{address:x}: {mnemonic} with no flag setter")
                    else:
                        setter, setter_ops, regs_state = seen_flags[-1]
                        regs = _registers(setter_ops)
                        if (
                            (setter.rstrip("qlwb") not in _COMPARES and setter not in _COMPARES)
                            or "(" in setter_ops
                            or any(r not in regs_state for r in regs)
                        ):
                            problems.append(f"{address:x}: {mnemonic} after {setter} {setter_ops}")
                if mnemonic == "jmp":
                    state = set(entry_state) | {"<unreachable>"}
                continue
            if not _NO_FLAGS.match(mnemonic):
                seen_flags.append((mnemonic, operands, set(state)))
            written = _writes(mnemonic, operands)
            if written is not None:
                if _is_control_write(mnemonic, operands, state):
                    state.add(written)
                else:
                    state.discard(written)
        if new_targets == at_target:
            break
        at_target = new_targets
    return problems


@pytest.fixture(scope="module")
def so_path() -> str:
    from keystile import _speedups

    return str(_speedups.__file__)


@pytest.mark.parametrize("symbol", KERNELS)
def test_kernel_branches_only_on_the_loop_counter(so_path: str, symbol: str) -> None:
    """Every conditional jump in the kernel tests the entry count or a loop index."""
    rows = _parse(so_path, symbol)
    assert rows, f"{symbol} not found in {so_path}"
    assert check_kernel(rows) == []


def test_the_check_catches_a_data_dependent_branch() -> None:
    """The checker itself: an early exit on a loaded tag is reported."""
    rows = [
        (0x10, "xor", "%eax,%eax"),
        (0x12, "mov", "(%rdi,%rax,8),%rdx"),
        (0x16, "cmp", "%rdx,%rcx"),
        (0x19, "je", "30 <early_exit>"),
        (0x1B, "add", "$0x1,%rax"),
        (0x1F, "cmp", "%rax,%rsi"),
        (0x22, "jne", "12 <loop>"),
        (0x24, "ret", ""),
    ]
    problems = check_kernel(rows)
    assert len(problems) == 1 and "je after cmp %rdx,%rcx" in problems[0]
