"""`vprkit <verb> ...`: argument parsing, and the error contract of every verb.

A verb module defines `add_arguments(parser)` and `run(args) -> int`, or, for several verbs,
`COMMANDS = {verb: (add_arguments, run)}`. Modules are imported only when their verb runs, so
`vprkit --help` stays fast.

An expected failure (see `vprkit.errors`) prints one line on stderr,
`vprkit <verb>: error: <what>, <which file or option>, <what to do>`, and exits with 1 (2 for
usage errors, 130 for Ctrl-C); a bug keeps its traceback. `--debug` (or `VPRKIT_DEBUG=1`)
prints the traceback of expected failures too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import traceback

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("vprkit.demo", "the main job: synthetic city, train from scratch, evaluate"),
    "models": ("vprkit.models.registry", "list the registered model names"),
    "weights": ("vprkit.hub", "list, download and verify official weight files"),
    "eval": ("vprkit.evaluate", "evaluate a model on a benchmark: Recall@N, results, pictures"),
    "extract": ("vprkit.stage_commands", "stage 1: global (and local) descriptors of images"),
    "retrieve": ("vprkit.stage_commands", "stage 2: each query's nearest database images"),
    "rerank": ("vprkit.stage_commands", "stage 3: re-order candidates with local features"),
    "score": ("vprkit.stage_commands", "stage 4: Recall@N of predictions against ground truth"),
    "train": ("vprkit.train.loop", "train a method (one loop; torchrun for several processes)"),
    "synth": ("vprkit.data.synthetic", "generate synthetic places (GSV-Cities and VG formats)"),
    "mine": ("vprkit.mine", "pre-compute hard negatives for training (R2Former's file)"),
    "map": ("vprkit.maps.commands", "build, grow, inspect and verify a map of geotagged photos"),
    "localize": ("vprkit.maps.commands", "where photos were taken, on a map: position, confidence"),
    "export": ("vprkit.export.cli", "a model as an ONNX or TorchScript file, for deployment"),
    "serve": ("vprkit.serve.command", "an HTTP localization service for a map, with a map page"),
}

DEBUG_HELP = "show the traceback of every failure (also VPRKIT_DEBUG=1)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except where there is none to show (a required flag, or
    None: the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, [], False):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (the contract), without the
    usage text argparse prints before them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vprkit", description="Visual place recognition toolkit.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (_, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, formatter_class=HelpFormatter)
        # Also after the verb; SUPPRESS keeps a global --debug from being reset to False.
        verb_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
        # The verb's own arguments are added lazily, only for the verb being run.
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `vprkit ARGV` and return its exit status (never calls sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    debug = "--debug" in argv or os.environ.get("VPRKIT_DEBUG", "") not in ("", "0")
    prog = f"vprkit {verb}" if verb in VERBS else "vprkit"
    try:
        parser = build_parser()
        verb_parser = parser
        if verb in VERBS:
            add_arguments, _ = _verb_functions(verb)
            sub_action = next(
                a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            )
            verb_parser = sub_action.choices[verb]
            add_arguments(verb_parser)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's parser: `vprkit <verb>: error: ...`
            verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args._command = shlex.join(["vprkit", *argv])  # for the run folders' logs
        _, run = _verb_functions(args.verb)
        from vprkit.allocator import keep_freed_memory

        keep_freed_memory()  # batches reuse each other's memory (see vprkit.allocator)
        return int(run(args) or 0)
    except SystemExit as exit_:  # argparse's usage errors (2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _close_progress_bars()
        print(
            f"{prog}: interrupted (Ctrl-C); finished files are intact, the output being "
            "written is left marked unfinished (.incomplete, .partial or .tmp)",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise  # a bug: the traceback is what helps
        if debug:
            traceback.print_exc()
        _close_progress_bars()
        print(f"{prog}: error: {message}", file=sys.stderr)
        from vprkit.errors import UsageError

        return 2 if isinstance(err, UsageError) else 1


def _close_progress_bars() -> None:
    """Clear the progress bars a failure left open, so the error starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _verb_functions(verb: str):
    module = importlib.import_module(VERBS[verb][0])
    commands = getattr(module, "COMMANDS", None)
    return commands[verb] if commands else (module.add_arguments, module.run)


# The operating system's refusals a user can act on, with what to do about them.
_OS_HINTS: dict[type[OSError], str] = {
    FileNotFoundError: "check the path",
    NotADirectoryError: "give a folder",
    IsADirectoryError: "give a file, not a folder",
    FileExistsError: "choose another path, or remove it",
    PermissionError: "check its permissions, or choose another path",
}


def user_message(err: BaseException) -> str | None:
    """The one-line message of an expected failure (`vprkit.errors`), None for a bug."""
    from vprkit.errors import VprkitError, disk_full, is_disk_full

    if isinstance(err, VprkitError):
        return one_line(str(err)) or type(err).__name__
    if is_disk_full(err):
        return str(disk_full(err.filename or "the output"))
    for kind, hint in _OS_HINTS.items():
        if isinstance(err, kind):
            if err.filename is not None:  # raised by the OS: "[Errno 2] ..." reads poorly
                return f"{err.filename}: {err.strerror.lower()}; {hint}"
            return one_line(str(err))
    return None


def one_line(text: str) -> str:
    """A message's lines joined: the contract is one line on stderr."""
    out = ""
    for line in (line.strip() for line in text.splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


if __name__ == "__main__":
    sys.exit(main())
