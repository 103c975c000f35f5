"""Recipes: the whole pipeline from one TOML file, resumable.

A recipe is a list of ``[[step]]`` tables; each names its ``command`` and takes that subcommand's options under the
same names (``max_windows`` or ``max-windows``; ``true``/``false`` for flags; ``~``, ``${VAR}`` and
``${VAR:-default}`` are expanded)::

    [[step]]
    command = "calibrate"
    model = "HuggingFaceTB/SmolLM2-135M"
    dataset = "wikitext2"

    [[step]]
    command = "prune"
    method = "wanda"
    pattern = "2:4"

Resume: every step is identified by a fingerprint chained over the entries before it (its command, its options and
the content of the local files it names), recorded in the manifest by the step itself. A re-run skips the longest
prefix of entries whose fingerprints are recorded in order, and runs the rest; when an entry changed, the workdir
goes back to the hard-linked snapshot taken before that entry, so what follows is recomputed from the right state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llmprune import pruning, report
from llmprune.fsio import sha256_file
from llmprune.methods import method_options
from llmprune.options import REQUIRED, option
from llmprune.steps import KINDS
from llmprune.steps.base import Step, from_mapping, to_argv
from llmprune.steps.registry import STEPS
from llmprune.workdir import SNAPSHOTS, Workdir, check_fresh, remove_scaffolding
from llmprune.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

STEP_COMMANDS = tuple(KINDS)
# Order of the commands that change the model; eval may come anywhere after calibrate.
RANK = {name: s.order for name, s in KINDS.items() if s.order is not None}
NOT_RECORDED = tuple(name for name, s in KINDS.items() if not s.records)  # writes outside the workdir: always runs


@dataclass(frozen=True)
class RecipeOptions:
    """What ``llmprune run`` was asked for."""

    recipe: Path = option(REQUIRED, "TOML file: \\[\\[step]] tables, each a command and its options.")
    from_step: Optional[str] = option(None, "Restart at this step: its number (1-based) or command name.",
                                      flag="--from")
    dry_run: bool = option(False, "Print the plan (what runs, what is skipped and why); change nothing.")


@dataclass
class Entry:
    index: int  # 0-based position in the recipe
    command: str
    options: dict[str, Any]  # as written in the recipe (keys with underscores): what its fingerprint covers
    fingerprint: str = ""

    @property
    def where(self) -> str:
        return f"recipe step {self.index + 1} ({self.command})"

    def step_options(self) -> Any:
        """The options of the entry's step, exactly as the step's command line would give them."""
        return from_mapping(STEPS[self.command], self.options, self.where)


def load(path: Path) -> list[Entry]:
    """Parse and check a recipe: each entry's options are its step's, by the names the step declares, so a recipe
    accepts exactly what the subcommand accepts."""
    try:
        doc = tomllib.loads(read_recipe(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"step"})
    if extra:
        raise UserError(f"recipe {path}: unknown top-level key(s) {', '.join(extra)}; use [[step]] tables")
    steps = doc.get("step")
    if not isinstance(steps, list) or not steps:
        raise UserError(f"recipe {path} has no [[step]] tables")
    entries = []
    for i, raw in enumerate(steps):
        raw = dict(raw)
        cmd = raw.pop("command", None)
        if cmd not in STEP_COMMANDS:
            raise UserError(f"recipe step {i + 1}: command must be one of {', '.join(STEP_COMMANDS)}, got {cmd!r}")
        known = STEPS[cmd].lookup()
        opts = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise UserError(f"recipe step {i + 1} ({cmd}): unknown option '{key}'; "
                                f"{cmd} takes {', '.join(sorted(known))}")
            if known[name].is_flag and not isinstance(value, bool):
                raise UserError(f"recipe step {i + 1} ({cmd}): '{key}' is a flag; use true or false")
            if isinstance(value, dict) or isinstance(value, list) and not known[name].repeated:
                raise UserError(f"recipe step {i + 1} ({cmd}): '{key}' must be a single value")
            if isinstance(value, list) and not all(isinstance(v, (str, int, float)) for v in value):
                raise UserError(f"recipe step {i + 1} ({cmd}): '{key}' must be a list of values")
            if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) >= 2**63:
                raise UserError(f"recipe step {i + 1} ({cmd}): '{key}' = {value!r} is not a finite number that an "
                                "option can take")
            if isinstance(value, str):
                value = _expand(value, f"recipe step {i + 1} ({cmd}), '{key}'")
            elif isinstance(value, list):  # a repeated option (eval's datasets): each value expanded the same way
                value = [_expand(v, f"recipe step {i + 1} ({cmd}), '{key}'") if isinstance(v, str) else v
                         for v in value]
            opts[name] = value
        entries.append(Entry(i, cmd, opts))
    check_order(entries)
    for e in entries:
        e.step_options()  # every value of the right type before anything runs
        if e.command == "prune":
            _check_method_options(e)
    return entries


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few dozen lines; anything this large is not one


def read_recipe(path: Path) -> str:
    """A recipe's text: a regular file (not a FIFO, a device such as /dev/zero, a folder) under a size bound, so
    reading it can neither block forever nor exhaust memory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"recipe {path} does not exist") from None
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"recipe {path} is not a regular file")
    if st.st_size > MAX_RECIPE_BYTES:
        raise UserError(f"recipe {path} is {st.st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    with open(path, "rb") as f:
        return f.read(MAX_RECIPE_BYTES + 1).decode("utf-8")


def _check_method_options(e: Entry) -> None:
    """A prune step's method options must be its method's (checked before anything runs, not at that step)."""
    declared = method_options()
    try:
        method = pruning.method_for(str(e.options.get("method", "wanda")))
        pruning.check_options_belong(method, {k: v for k, v in e.options.items() if k in declared})
    except UserError as err:
        raise UserError(f"recipe step {e.index + 1} (prune): {err}") from None


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _expand(value: str, where: str) -> str:
    """``~``, ``$VAR`` / ``${VAR}`` and ``${VAR:-default}`` (the shell's meaning: the default when VAR is unset or
    empty) in string values, so one recipe serves every machine and CI job."""
    out = _DEFAULTED.sub(lambda m: os.environ.get(m.group(1)) or m.group(2), value)
    out = os.path.expandvars(os.path.expanduser(out))
    left = re.search(r"\$\{?(\w+)", out)
    if left:
        raise UserError(f"{where}: environment variable {left.group(1)} is not set")
    return out


def check_order(entries: list[Entry]) -> None:
    if entries[0].command != "calibrate" and any(e.command == "calibrate" for e in entries):
        raise UserError("recipe: calibrate must be the first step")
    last = -1
    for e in entries:
        if e.command == "calibrate" and e.index > 0:
            raise UserError(f"recipe step {e.index + 1}: calibrate may only be the first step")
        if e.command == "eval":
            continue
        rank = RANK[e.command]
        if rank < last:
            raise UserError(f"recipe step {e.index + 1} ({e.command}) is out of order: the steps go calibrate → "
                            "regularize → prune → recover → eval → export")
        last = max(last, rank)
    for e in entries:
        if e.command == "regularize" and not any(
                f.index > e.index and f.command == "prune" and f.options.get("method") == "dress" for f in entries):
            raise UserError(f"recipe step {e.index + 1}: regularize must be followed by a prune with method = \"dress\"")
    exports = [e.index for e in entries if e.command == "export"]
    if exports and exports[-1] != len(entries) - 1 and any(
            e.command != "eval" for e in entries[exports[0] + 1:] if e.command != "export"):
        raise UserError("recipe: export must come after the steps that change the model")


def argv(entry: Entry, workdir: Path) -> list[str]:
    """The command line that runs the entry, as a user would type it (shown in the plan and the log)."""
    return [entry.command, str(workdir), *to_argv(STEPS[entry.command], entry.options)]


def _file_identity(value: Any) -> str | None:
    """Content hash of a local file an option names (a dataset, a GGUF); size+mtime of a folder's files; of each
    file a list names (eval's datasets), together."""
    if isinstance(value, list):
        found = [_file_identity(v) for v in value]
        return hashlib.sha256(json.dumps(found).encode()).hexdigest() if any(found) else None
    if not isinstance(value, str) or "\n" in value or len(value) > 4096:
        return None
    p = Path(value)
    try:
        if p.is_file():
            return sha256_file(p)
        if p.is_dir():
            files = sorted((f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                           for f in p.rglob("*") if f.is_file())
            return hashlib.sha256(json.dumps(files).encode()).hexdigest()
    except OSError:
        return None
    return None


def fingerprint(entries: list[Entry]) -> None:
    """Chain: each entry's fingerprint covers itself and everything before it."""
    prev = ""
    for e in entries:
        files = {k: _file_identity(v) for k, v in e.options.items() if k not in ("out", "push_to_hub")}
        body = json.dumps({"prev": prev, "command": e.command, "options": e.options,
                           "files": {k: v for k, v in files.items() if v}}, sort_keys=True, default=str)
        e.fingerprint = prev = hashlib.sha256(body.encode()).hexdigest()


def ran_entries(manifest_steps: list[dict[str, Any]]) -> list[str | None]:
    """The fingerprint of each recipe entry the workdir's history holds, in order: the steps one entry recorded (an
    eval of several datasets records one step each) count once; a step not run by a recipe is None."""
    out: list[str | None] = []
    last = None
    for s in manifest_steps:
        tag = s.get("recipe") or {}
        key = (tag.get("index"), tag.get("fingerprint"))
        if tag and key == last:
            continue
        out.append(tag.get("fingerprint"))
        last = key if tag else None
    return out


def done_prefix(entries: list[Entry], manifest_steps: list[dict[str, Any]]) -> int:
    """How many leading entries are done: their fingerprints are recorded, in order, at the start of the workdir's
    history. (Entries that are not recorded, like export, always run again.)"""
    done = 0
    history = iter(ran_entries(manifest_steps))
    for e in entries:
        if e.command in NOT_RECORDED:
            break
        if next(history, None) != e.fingerprint:
            break
        done = e.index + 1
    return done


# --- planning and running ---------------------------------------------------------------------------------------
@dataclass
class RecipePlan:
    """What a run of the recipe on a workdir does: which entries are done, which state to go back to first."""

    entries: list[Entry]
    done: int  # the first ``done`` entries are skipped
    restore: str | None  # the snapshot to restore before running (an entry changed), or None
    restore_to_step: int  # how many recorded entries that snapshot holds
    rows: list[dict[str, Any]] = field(default_factory=list)  # per entry: step, command, action, why, argv


def plan(entries: list[Entry], ws: Workdir, from_step: str | None) -> RecipePlan:
    """Which entries of the recipe run on ``ws`` and why. ``from_step`` (a 1-based number or a command name)
    forces a restart point."""
    if entries[0].command != "calibrate":
        raise UserError("a recipe starts with a calibrate step, so that the whole pipeline is reproducible from it")
    fingerprint(entries)
    steps = ws.manifest()["steps"] if ws.exists() else []
    done = done_prefix(entries, steps)
    history = ran_entries(steps)
    if from_step is not None:
        if from_step.isdigit() and 1 <= int(from_step) <= len(entries):
            start = int(from_step) - 1
        else:
            start = next((e.index for e in entries if e.command == from_step), -1)
            if start < 0:
                raise UserError(f"--from {from_step}: no such step (use 1..{len(entries)} or a command of the recipe)")
        done = min(done, start)
    recorded_done = [e for e in entries[:done] if e.command not in NOT_RECORDED]
    restore = recorded_done[-1].fingerprint[:16] if recorded_done and len(history) != len(recorded_done) else None
    if restore and not (ws.path / SNAPSHOTS / restore).is_dir():
        done, recorded_done, restore = 0, [], None  # no state to go back to: start over
    rows = []
    for e in entries:
        if e.index < done:
            why = "skip: done with the same options and inputs"
        elif e.command in NOT_RECORDED:
            why = "run: not recorded in the workdir, always runs"
        elif e.index < len(history) and history[e.index] == e.fingerprint:
            why = "run: forced by --from" if from_step is not None and e.index >= done else "run"
        elif e.index < len(history):
            why = "run: its options or inputs changed" if e.index == done else "run: an earlier step changes"
        else:
            why = "run: not done yet"
        rows.append({"step": e.index + 1, "command": e.command, "action": why.split(":")[0], "why": why,
                     "argv": argv(e, ws.path)[2:]})
    return RecipePlan(entries, done, restore, len(recorded_done), rows)


def execute(p: RecipePlan, ws: Workdir, show: Callable[[str, dict[str, Any], Any], None]) -> list[dict[str, Any]]:
    """Run the plan: restore the snapshot it names, then each entry that is not done -- its step run with the options
    its command line would give (``show(command, result, options)`` prints what the command prints) and the entry
    recorded in the step -- snapshotting after each. Returns what ran, with its wall seconds."""
    entries = p.entries
    recorded_done = [e for e in entries[:p.done] if e.command not in NOT_RECORDED]
    if p.restore:
        report.info(f"going back to the state after step {p.restore_to_step} (hard-linked snapshot)")
        ws.restore(p.restore)
    elif recorded_done:
        ws.snapshot(recorded_done[-1].fingerprint[:16])  # in case a kill came between a commit and its snapshot
    ran = []
    for e in entries[p.done:]:
        args, options = argv(e, ws.path), e.step_options()
        if e.command == "calibrate" and ws.path.exists():
            args.append("--force")  # a changed first step starts the workdir over
            options = dataclasses.replace(options, force=True)
        report.info(f"llmprune {' '.join(args)}", lead=f"step {e.index + 1}/{len(entries)}")
        t0 = time.perf_counter()
        tagged = Workdir(ws.path, verify=ws.verify_inputs, recipe={"index": e.index, "fingerprint": e.fingerprint})
        show(e.command, STEPS[e.command].run(tagged, options), options)
        if e.command not in NOT_RECORDED:
            ws.snapshot(e.fingerprint[:16])
        ran.append({"step": e.index + 1, "command": e.command, "seconds": round(time.perf_counter() - t0, 2)})
    ws.drop_snapshots({e.fingerprint[:16] for e in entries})
    return ran


def run(ws: Workdir, o: RecipeOptions, show: Callable[[str, dict[str, Any], Any], None]) -> dict[str, Any]:
    """``llmprune run``: plan the recipe on the workdir and, unless ``dry_run``, run it with the workdir held across
    every step (no other command slips in between two of them)."""
    entries = load(o.recipe)
    head = {"workdir": str(ws.path), "recipe": str(o.recipe)}
    if o.dry_run:
        p = plan(entries, ws, o.from_step)
        return {**head, "dry_run": True, "restore_to_step": p.restore_to_step if p.restore else None, "plan": p.rows}
    if ws.exists():
        ws.manifest()  # checked before the lock is taken in it
    elif ws.path.exists():
        check_fresh(ws.path, force=False)  # a foreign folder is refused before anything is written into it
    created = not ws.path.exists()
    try:
        with ws.hold():
            p = plan(entries, ws, o.from_step)
            ran = execute(p, ws, show)
    finally:
        if created:
            remove_scaffolding(ws.path)  # a first step that failed leaves no folder behind
    steps = ws.manifest()["steps"]
    last_eval = next((s["metrics"] for s in reversed(steps) if s["command"] == "eval"), {})
    return {**head, "plan": p.rows, "ran": ran, "skipped": [r["step"] for r in p.rows if r["action"] == "skip"],
            "perplexity": last_eval.get("perplexity"), "parameters": last_eval.get("parameters")}


STEP = Step("run", RecipeOptions, run, "Run a whole pipeline from a recipe; a re-run skips the steps already done "
            "with the same options and inputs.")
