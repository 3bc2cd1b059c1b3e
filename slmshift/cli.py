"""`slmshift` command line: run experiments, manage packaged models, re-print reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from slmshift.platform.errors import SlmshiftError

app = typer.Typer(help="Measure and perform the move of agent teams from large to small language models, on Ray.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Packaged models: list them, convert them into the local cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Piped output (CI, `| tee`) gets wide tables instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=200)
err_console = Console(stderr=True)


def _fail(e: SlmshiftError) -> None:
    err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


@app.command()
def run(
    config: Path = typer.Argument(..., help="Experiment YAML, e.g. scenarios/quickstart.yaml."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto', 'ray://HEAD:10001'); "
                                          "default: RAY_ADDRESS, then ray.address in the YAML, else embedded."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Override experiment.storage (path or s3:// URI)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="Override every scenario's episodes."),
) -> None:
    """Run an experiment end to end and print its summary."""
    import slmshift.scenarios  # noqa: F401  fills the scenario registry
    from slmshift.platform.config import load_config
    from slmshift.platform.report import print_summary
    from slmshift.platform.scenario import scenario_options
    from slmshift.runner import run_experiment

    try:
        cfg = load_config(config, scenario_options())
        if episodes:
            cfg = cfg.model_copy(update={"scenarios": [s.model_copy(update={"episodes": episodes}) for s in cfg.scenarios]})
        result = run_experiment(cfg, address=address, storage=storage, console=console)
    except SlmshiftError as e:
        _fail(e)
    print_summary(result.summary, console)
    c = result.log_counts
    console.print(f"{c.get('interactions', 0)} calls and {c.get('episodes', 0)} episodes logged in {result.wall_s:.0f} s. "
                  f"Report: {result.run_dir}/report.md  Log: {result.run_dir}/interactions/")


@app.command()
def report(run_dir: str = typer.Argument(..., help="A run directory printed by `slmshift run`.")) -> None:
    """Recompute and print the summary of a finished (or interrupted) run from its log."""
    from slmshift.platform.log import read_episodes, read_interactions
    from slmshift.platform.report import print_summary, summarize

    try:
        df, ep = read_interactions(run_dir), read_episodes(run_dir)
    except SlmshiftError as e:
        _fail(e)
    if df.empty:
        _fail(SlmshiftError(f"{run_dir}: no interaction log found. Fix: pass a run directory printed by `slmshift run`."))
    print_summary(summarize(df, ep), console)


@models_app.command("list")
def models_list() -> None:
    """Packaged models that work offline, and whether they are in the cache."""
    from slmshift.serve.sources import PACKAGED, cache_dir

    for name, entry in PACKAGED.items():
        present = (cache_dir() / "models" / name).is_dir()
        console.print(f"packaged:{name}  {entry}  {'cached' if present else 'not pulled yet'}")


@models_app.command("pull")
def models_pull(name: str = typer.Argument("smollm2-135m", help="Packaged model name."),
                force: bool = typer.Option(False, "--force", help="Convert again even if cached.")) -> None:
    """Convert a packaged model into the local cache once (later loads are fast)."""
    from slmshift.serve.sources import pull_packaged

    try:
        path = pull_packaged(name, force=force, progress=lambda msg: console.print(msg))
    except SlmshiftError as e:
        _fail(e)
    console.print(f"packaged:{name} ready at {path}")


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: the log written so far is kept; `slmshift report RUN_DIR` summarises it.")
        sys.exit(130)


if __name__ == "__main__":
    main()
