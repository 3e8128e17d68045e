"""The ``dense-rlhf`` command: ``demo`` (the main job), ``experiment`` (the full study), ``grpo-study`` (GRPO with
ABC's token-level credit) and ``bench``.

Each command writes into ``./dense-rlhf-results/<command>/`` unless ``--out`` says otherwise. The study commands
need the ``demo`` extra; their modules are checked before any work, so that a missing one stops the command at
once with the install line instead of after minutes of training.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys

# name: (module with main(argv), one line for the usage)
_COMMANDS = {
    "demo": ("dense_rlhf.study.demo", "train a small RLHF setup and compare sparse rewards with ABC"),
    "experiment": ("dense_rlhf.study.experiment", "the full multi-seed comparison of reward methods"),
    "grpo-study": ("dense_rlhf.study.grpo_study", "GRPO with ABC's token-level advantages beside PPO"),
    "bench": ("dense_rlhf.bench.run", "microbenchmarks of dense_rewards against the alternatives"),
}
# The extra (pyproject.toml) whose packages a command imports; checked before it starts.
_EXTRAS = {"demo": "demo", "experiment": "demo", "grpo-study": "demo"}

RESULTS_ROOT = "dense-rlhf-results"


def default_out(command: str) -> str:
    """Where ``command`` writes without ``--out``: a folder of the current directory named for the command."""
    return f"{RESULTS_ROOT}/{command}"


def usage() -> str:
    lines = ["usage: dense-rlhf {" + ",".join(_COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<11} {text}" for name, (_, text) in _COMMANDS.items()]
    lines += [
        "",
        f"Results go to ./{RESULTS_ROOT}/<command>/ unless --out is given; "
        "`dense-rlhf <command> --help` lists the options.",
    ]
    return "\n".join(lines)


def extra_modules(extra: str) -> list[str]:
    """The top-level modules of the distributions that ``extra`` lists in this package's metadata (pyproject.toml),
    in order; empty when the package's metadata cannot be found (running from a tree that is not installed)."""
    try:
        requires = importlib.metadata.requires("dense-rlhf") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(r"""extra\s*==\s*["']""" + re.escape(extra) + r"""["']""")
    names = [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0) for req in requires if marker.search(req)]
    return list(dict.fromkeys(name.lower().replace("-", "_") for name in names))


def missing_modules(modules: list[str]) -> list[str]:
    """The modules that cannot be imported, found without importing any of them."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_extra(command: str, extra: str) -> str | None:
    """None if every module of ``extra`` is importable, else the message that names the missing ones and the
    install line."""
    missing = missing_modules(extra_modules(extra))
    if not missing:
        return None
    return (
        f"dense-rlhf {command} needs the '{extra}' extra, and these of its packages are not installed: "
        f'{", ".join(missing)}.\nInstall them with:  pip install "dense-rlhf[{extra}]"'
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in _COMMANDS:
        if argv:
            print(f"dense-rlhf: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    extra = _EXTRAS.get(argv[0])
    if extra:
        message = check_extra(argv[0], extra)
        if message:
            print(message, file=sys.stderr)
            return 1
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
