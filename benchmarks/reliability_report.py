"""Markdown for ``docs/RELIABILITY.md`` from the result of ``benchmarks/reliability.py``."""

from __future__ import annotations

from typing import Any

from benchmarks.common import machine_line

OUTCOMES = ("rejected", "identical", "silent", "valid_other", "crash", "hang")


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")[:220]


def _fuzz(res: list[dict[str, Any]] | dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 1. Fuzzing per decoder", "",
           "Mutated blobs of real-looking weights (N(0, 0.02) with 0.1 % outliers, 4096 elements) per backend, dtype "
           "and mode; mutations: random byte flips, single bit flips, truncations, insertions, header field "
           "overwrites. *as is*: decoded as mutated (the CRC-32 should reject them; a different decode is a silent "
           "corruption). *CRC fixed*: the CRC recomputed after the mutation, to exercise the structural checks (a "
           "different decode is then a well-formed blob, `valid_other`). Target: 0 silent, 0 crash, 0 hang.", "",
           "| backend | CRC | cases | " + " | ".join(OUTCOMES) + " | seconds |",
           "|---|---|---|" + "---|" * len(OUTCOMES) + "---|"]  # fmt: skip
    if isinstance(res, dict):
        return [*out, f"Section failed: {res.get('error')}", ""]
    fails = []
    for r in res:
        if r.get("error"):
            out.append(f"| {r['backend']} | - | failed: {_cell(r['error'])} |" + " |" * (len(OUTCOMES) + 1))
            missed.append(f"fuzz {r['backend']}: {r['error']}")
            continue
        for fixed in (False, True):
            rows = [x for x in r["rows"] if x["crc_fixed"] == fixed]
            tot = {k: sum(x.get(k, 0) for x in rows) for k in ("cases", *OUTCOMES)}
            out.append(f"| {r['backend']} | {'fixed' if fixed else 'as is'} | {tot['cases']} | "
                       + " | ".join(str(tot[k]) for k in OUTCOMES) + f" | {r.get('seconds', '')} |")  # fmt: skip
            for k in ("silent", "crash", "hang"):
                if tot[k]:
                    missed.append(f"fuzz {r['backend']} ({'CRC fixed' if fixed else 'as is'}): {tot[k]} {k}")
        fails += [{**f, "backend": r["backend"]} for f in r["failures"]]
    if fails:
        out += ["", "Failing cases (first of each backend, dtype, mode and outcome):", "",
                "| backend | dtype | mode | CRC | mutation | outcome | detail | blob prefix (hex) |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        seen = set()
        for f in fails:
            key = (f["backend"], f["dtype"], f["mode"], f["outcome"])
            if key in seen:
                continue
            seen.add(key)
            crc = "fixed" if f["crc_fixed"] else "as is"
            out.append(
                f"| {f['backend']} | {f['dtype']} | {f['mode']} | {crc} | "
                f"{f['mutation']} | {f['outcome']} | {_cell(f['detail'])} | `{f['blob_hex'][:64]}` |"
            )
    return [*out, ""]


def _bombs(res: list[dict[str, Any]] | dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 2. Decompression bombs", "",
           "Each crafted input in its own process; peak = `VmHWM` after the case minus `VmHWM` after the imports "
           "and the crafting (a killed case: polled from outside). Bound: 2 x input size + 64 MB; a case passes "
           "when it ends in an error within the bound.", "",
           "| input and entry point | input bytes | peak MB | bound MB | outcome | error | pass |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    if isinstance(res, dict):
        return [*out, f"Section failed: {res.get('error')}", ""]
    for r in res:
        code = f" (exit {r['exit_code']})" if r.get("exit_code") is not None else ""
        out.append(f"| {_cell(r['case'])} | {r['input_bytes']} | {r['peak_bytes'] / 2**20:.1f} | "
                   f"{r['bound_bytes'] / 2**20:.1f} | {r['outcome']}{code} | {_cell(r.get('type') or '')}: "
                   f"{_cell(r.get('message'))} | {'yes' if r['pass'] else '**no**'} |")  # fmt: skip
        if not r["pass"]:
            missed.append(f"bomb {r['case']}: {r['outcome']}, peak {r['peak_bytes'] / 2**20:.0f} MB")
    return [*out, ""]


def _pickle(res: list[dict[str, Any]] | dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 3. Hostile pickles", "",
           "A `torch.save` file holding an object whose `__reduce__` touches a marker file, fed to every entry point "
           "that reads a checkpoint or weights file. Target: the marker is never created.", "",
           "| entry point | code ran | outcome | error |", "|---|---|---|---|"]  # fmt: skip
    if isinstance(res, dict):
        return [*out, f"Section failed: {res.get('error')}", ""]
    for r in res:
        code = f" (exit {r['exit_code']})" if r.get("exit_code") is not None else ""
        out.append(f"| {_cell(r['case'])} | {'**YES**' if r['code_ran'] else 'no'} | {r['outcome']}{code} | "
                   f"{_cell(r.get('message'))} |")  # fmt: skip
        if r["code_ran"]:
            missed.append(f"pickle executed via {r['case']}")
    return [*out, ""]


def _bitflips(res: dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 4. Checkpoint bit flips", "",
           "`benchmarks/bitflip_checkpoints.py`: one random bit flipped inside a tensor storage of a checkpoint, "
           "loaded with `NeuZipStrategy.load_checkpoint`. Target: 0 silent over 1,000 trials per format.", "",
           "| format | trials | detected | silent |", "|---|---|---|---|"]  # fmt: skip
    for r in res.get("rows", []):
        out.append(f"| {r['format']} | {r['trials']} | {r['detected']} | {r['silent']} |")
        if r["silent"] or r["trials"] < 1000:
            missed.append(f"bit flips {r['format']}: {r['silent']} silent of {r['trials']}")
    if not res.get("rows"):
        out.append(f"Failed: {_cell(res.get('error'))}")
        missed.append(f"bit flips: {res.get('error')}")
    return [*out, "", f"Runtime: {res.get('seconds')} s.", ""]


def _kill(res: dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 5. Kill and resume", "",
           "`benchmarks/kill_resume.py`: SIGKILL a `train.py +strategy=neuzip` run after a random periodic checkpoint "
           "(+0-300 ms), resume from `last.ckpt`, compare `final.ckpt` bit for bit with an uninterrupted run. "
           f"Target: 10/10. Source: {res.get('source')}.", ""]  # fmt: skip
    if res.get("identical") is None:
        missed.append(f"kill/resume: {res.get('error')}")
        return [*out, f"Failed: {_cell(res.get('error'))}", ""]
    out += ["| trials | bit-identical | seconds |", "|---|---|---|",
            f"| {res['total']} | {res['identical']} | {res.get('seconds')} |", ""]  # fmt: skip
    out += [f"- {t}" for t in res["trials"]]
    if res["identical"] != res["total"] or res["total"] < 10:
        missed.append(f"kill/resume: {res['identical']}/{res['total']} bit-identical")
    return [*out, ""]


def _bad(res: list[dict[str, Any]] | dict[str, Any], missed: list[str]) -> list[str]:
    out = ["## 6. Bad inputs per entry point", "",
           "`SystemExit` for the CLI means exit status 2 with an `nz-lightning: error: ...` line; for `train.py`, a "
           "non-zero exit with the error shown.", "",
           "| entry point and input | expected | got | message | pass |", "|---|---|---|---|---|"]  # fmt: skip
    if isinstance(res, dict):
        missed.append(f"bad inputs: {res.get('error')}")
        return [*out, f"Section failed: {res.get('error')}", ""]
    for r in res:
        out.append(f"| {_cell(r['case'])} | {r['expected']} | {r['got']} | {_cell(r['message'])} | "
                   f"{'yes' if r['pass'] else '**no**'} |")  # fmt: skip
        if not r["pass"]:
            missed.append(f"bad input {r['case']}: expected {r['expected']}, got {r['got']}")
    return [*out, ""]


def render(result: dict[str, Any]) -> tuple[str, list[str]]:
    """``(markdown, targets missed)`` for a result of ``benchmarks/reliability.py``."""
    missed: list[str] = []
    body = [*_fuzz(result.get("fuzz", {}), missed), *_bombs(result.get("bombs", {}), missed),
            *_pickle(result.get("pickle", {}), missed), *_bitflips(result.get("bitflips", {}), missed),
            *_kill(result.get("kill_resume", {}), missed), *_bad(result.get("bad_inputs", {}), missed)]  # fmt: skip
    head = ["# Reliability", "",
            "Generated by `python benchmarks/reliability.py` (raw figures: `benchmarks/out/reliability.json`); do not "
            "edit by hand." + (" **Quick run: reduced case counts.**" if result.get("quick") else ""), "",
            machine_line(result["machine"]) + f" Date {result['machine']['date']}, commit {result['machine']['git']}.",
            "", f"Total runtime: {result.get('total_seconds')} s ({result.get('seconds')}).", "",
            "## Targets missed", ""]  # fmt: skip
    head += [f"- {m}" for m in missed] or ["None."]
    return "\n".join([*head, "", *body]), missed
