"""How every main starts and ends: `run(main)` is absl's `app.run`, except that bad input
ends the process with one line naming the problem and the fix, exit code 2, no traceback."""

import os
import sys
from pathlib import Path

from absl import flags

# Bad input, as the library raises it: a message that names the problem and the fix. Other
# exceptions are bugs and keep their traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
TRACEBACK_ENV = "JDISTILL_TRACEBACK"  # =1: bad input raises with its traceback (debugging)


def output_dir(path) -> Path:
    """--out as a folder the main creates when it first writes: an existing file there is
    bad input (said before any work)."""
    if path is None:
        raise ValueError("--out is required: the folder to write into")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={out} is an existing file, not a directory; give a folder "
                         "path (it is created if missing)")
    return out


def fail(prog: str, message) -> None:
    """Ends the process on bad input: `PROG: error: MESSAGE` on one line, exit code 2."""
    text = " ".join(str(message).split("\n")).strip() or type(message).__name__
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if _process_count() > 1:  # a normal exit would wait at JAX's barrier for the others
        os._exit(2)
    sys.exit(2)


def _process_count() -> int:
    jax = sys.modules.get("jax")  # a main that never imported JAX is one process
    return jax.process_count() if jax is not None else 1


def parse_flags(argv):
    """absl's flag parsing, with a bad flag ending as `fail` does."""
    from absl import app

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_prog(argv), f"{e} (--helpshort lists the flags)")
    except app.UsageError as e:
        fail(_prog(argv), e)


def _prog(argv) -> str:
    """The main's name (`python -m experiments.fit` runs .../experiments/fit.py)."""
    return os.path.splitext(os.path.basename(argv[0]))[0] if argv else "jdistill"


def run(main):
    """`absl.app.run(main)`, except that
      - bad input (a flag, a path, a setting: `USER_ERRORS` and absl's UsageError) ends the
        process with one line and exit code 2, before anything is written (each main checks
        its inputs before its first write);
      - in a multi-process run any other error ends this process at once with a message
        saying what to do.

    Why the second: when one process dies, the others fail in their next collective (or the
    coordination service ends them after --heartbeat_timeout); a normal Python exit would
    then wait at JAX's shutdown barrier for the dead peer and abort with a C++ stack trace.
    """
    from absl import app

    def guarded(argv):
        from absl import flags as absl_flags
        from absl import logging

        if not absl_flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except (app.UsageError, *USER_ERRORS) as e:
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            fail(_prog(argv), e)
        except Exception as e:  # noqa: BLE001 - any failure takes the whole run down
            if _process_count() == 1:
                raise
            import traceback

            import jax

            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:500]
            print(f"\njdistill: process {jax.process_index()} of {jax.process_count()} stopped "
                  f"({type(e).__name__}: {first}).\nIn a multi-process run this usually means "
                  "another process died or was killed: see its log. Every process of the run "
                  "stops; rerun all of them with the same command to resume from the last "
                  "checkpoint.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    app.run(guarded, flags_parser=parse_flags)


# ------------------------------------------------------------------ the `jdistill` command

# subcommand -> the main it runs (experiments.NAME), in the order of the pipeline
MAINS = ("demo", "import_gguf", "prune", "supervise", "correct_teacher", "distill",
         "evaluate", "export", "sweep", "report", "fit", "plan", "benchmark")


def summary(name: str) -> str:
    """A main's one-line description: its docstring's first line, read without importing
    it (`jdistill --help` stays instant)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec(f"experiments.{name}").origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    width = max(map(len, MAINS))
    lines = ["usage: jdistill COMMAND [--flag=value ...]   (jdistill COMMAND --help: its flags)",
             "", "commands:"]
    lines += [f"  {name.replace('_', '-'):<{width}}  {summary(name)}" for name in MAINS]
    lines += ["", "Each command is also `python -m experiments.COMMAND` "
              "(e.g. experiments.import_gguf)."]
    return "\n".join(lines)


def console(argv=None) -> None:
    """`jdistill COMMAND ...`: runs experiments.COMMAND's main with the remaining flags."""
    import importlib

    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1].replace("-", "_")
    if name not in MAINS:
        print(f"jdistill: error: unknown command {argv[1]!r}; one of "
              f"{', '.join(m.replace('_', '-') for m in MAINS)} (jdistill --help)",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"experiments.{name}")
    getattr(module, "define_flags", lambda: None)()  # mains that define flags on demand
    sys.argv = [f"jdistill {argv[1]}", *argv[2:]]
    run(module.main)
