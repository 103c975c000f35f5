"""``llmprune run``: a whole pipeline from a recipe; planning and running are ``recipe.plan`` / ``recipe.execute``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import JsonOpt, Settings, WorkdirArg, finish, invoke_sibling, open_workdir
from llmprune.workdir import check_fresh, remove_scaffolding


def command_options(group) -> dict[str, dict[str, tuple[str, str]]]:
    """{command: {option key: (kind, option string)}} read from the CLI itself (``group``: the app's root command);
    keys are both the parameter name and the long option without dashes (``lam`` and ``lambda``)."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for name, cmd in group.commands.items():
        opts: dict[str, tuple[str, str]] = {}
        for prm in cmd.params:
            if prm.name in ("workdir", "as_json") or not getattr(prm, "opts", None) or not prm.opts[0].startswith("--"):
                continue
            entry = ("flag" if getattr(prm, "is_flag", False) else "value", prm.opts[0])
            opts[prm.name] = entry
            opts[prm.opts[0][2:].replace("-", "_")] = entry
        out[name] = opts
    return out


def run_recipe(
    ctx: typer.Context,
    workdir: WorkdirArg,
    recipe: Annotated[Path, typer.Option(help="TOML file: \\[\\[step]] tables, each a command and its options.")],
    from_step: Annotated[Optional[str], typer.Option("--from", help="Restart at this step: its number (1-based) or command name.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (what runs, what is skipped and why); change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole pipeline from a recipe; a re-run skips the steps already done with the same options and inputs."""
    from llmprune import recipe as _recipe
    options = command_options(ctx.find_root().command)
    entries = _recipe.load(recipe, options)
    ws = open_workdir(ctx, workdir)

    def argv_of(e: _recipe.Entry) -> list[str]:
        return _recipe.argv(e, workdir, options)

    if dry_run:
        plan = _recipe.plan(entries, ws, from_step, argv_of)
        result = {"workdir": str(workdir), "recipe": str(recipe), "dry_run": True,
                  "restore_to_step": plan.restore_to_step if plan.restore else None, "plan": plan.rows}
        finish(result, as_json, lambda: report.table(
            f"plan for {workdir} from {recipe}", ["#", "step", "action", "options"],
            [[p["step"], p["command"], p["why"], " ".join(p["argv"])] for p in plan.rows]))
        return
    settings = ctx.find_object(Settings) or Settings()
    if ws.exists():
        ws.manifest()  # checked before the lock is taken in it
    elif ws.path.exists():
        check_fresh(ws.path, force=False)  # a foreign folder is refused before anything is written into it
    created = not ws.path.exists()
    try:
        with ws.hold():  # held across every step: no other command slips in between two of them
            plan = _recipe.plan(entries, ws, from_step, argv_of)
            ran = _recipe.execute(plan, ws, argv_of,
                                  lambda args, tag: invoke_sibling(ctx, args, Settings(verify=settings.verify, recipe=tag)))
    finally:
        if created:
            remove_scaffolding(ws.path)  # a first step that failed leaves no folder behind
    steps = ws.manifest()["steps"]
    last_eval = next((s["metrics"] for s in reversed(steps) if s["command"] == "eval"), {})
    result = {"workdir": str(workdir), "recipe": str(recipe), "plan": plan.rows, "ran": ran,
              "skipped": [p["step"] for p in plan.rows if p["action"] == "skip"],
              "perplexity": last_eval.get("perplexity"), "parameters": last_eval.get("parameters")}
    finish(result, as_json, lambda: report.table(
        f"{workdir}: recipe {recipe} done", ["#", "step", "result"],
        [[p["step"], p["command"], next((f"ran in {r['seconds']:.1f} s" for r in ran if r["step"] == p["step"]),
                                         "skipped (done)")] for p in plan.rows]))
