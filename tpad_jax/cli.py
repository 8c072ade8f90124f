"""The launch commands' front door: a user error prints one line and exits 2; a program bug raises.

A user error is a fault in what the user gave: a data file (`raw.RawFormatError`), a flag or config key,
a path, a model that is not trained yet. Code raises `UserError` for those, with a message that says what
is wrong and where. Every `launch/` script calls `run(main)` instead of `absl.app.run(main)`; it prints
`<script>: error: <message>` on stderr, with no traceback, and exits with status 2. Any other exception
is a bug and raises as usual. `TPAD_VERBOSE=1` in the environment raises user errors too, with their
traceback.
"""

import os
import platform
import sys

from absl import app, flags, logging

VERBOSE_ENV = "TPAD_VERBOSE"
NATIVE_ISA_ENV = "TPAD_NATIVE_ISA"
# XLA compiles CPU code for the host's vector instructions, so the same run gives other floats on a
# machine with other instructions (tiny preset, same data and seed: the exported e_K differ between
# AVX2, AVX and SSE4.2 codegen; benchmarks/RESULTS.md). Capping at AVX2, which every x86 server of the
# last decade has, makes runs on AVX2 and AVX-512 machines compile the same code.
PINNED_CPU_ISA = "AVX2"
USER_ERROR_STATUS = 2
COMPILATION_CACHE_DIR = "~/.cache/tpad_jax/xla"


class UserError(ValueError):
    """A fault in the user's input (file, flag, config key, path, missing model); `str()` is the message."""


def run(main):
    """`absl.app.run` for a launch script's `main()`; it takes no arguments (positional ones are refused)."""
    pin_cpu_isa()
    use_compilation_cache()
    if "workdir" in flags.FLAGS:
        flags.register_validator("workdir", _can_be_directory, message="is a file (or inside one), "
                                 "expected a directory")
    app.run(lambda argv: _main_with_user_errors(main, argv), flags_parser=_parse_flags)


def pin_cpu_isa():
    """Caps XLA's CPU codegen at `PINNED_CPU_ISA` on x86 (before JAX starts its backend), unless the user
    set `--xla_cpu_max_isa` or `TPAD_NATIVE_ISA=1` (the host's own instructions: faster, not portable)."""
    existing = os.environ.get("XLA_FLAGS", "")
    if (platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get(NATIVE_ISA_ENV) == "1"
            or "--xla_cpu_max_isa" in existing):
        return
    os.environ["XLA_FLAGS"] = f"{existing} --xla_cpu_max_isa={PINNED_CPU_ISA}".strip()


def use_compilation_cache():
    """Keeps XLA's compiled programs in `COMPILATION_CACHE_DIR` unless the user set JAX's own
    JAX_COMPILATION_CACHE_DIR (an empty value turns the cache off).

    The 15-row run compiled ~280 programs in 249 s of its 30.5 minutes on 2 CPU cores, and the downstream
    rows of one architecture compile the same programs: the cache compiles them once per machine. JAX keys an entry
    by the program, the XLA flags (the ISA cap above included) and the jax/jaxlib version and backend,
    so an entry is only reused for the identical compilation.
    """
    import jax

    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(COMPILATION_CACHE_DIR))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        # JAX's default keeps only programs that took over 1 s to compile; most rows' steps take less.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        # Least recently used entries go beyond 2 GiB (a default run's programs take 12 MB).
        jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)


def _main_with_user_errors(main, argv):
    if not flags.FLAGS["verbosity"].present:
        # JAX (the backends it probes), Orbax and grain log at INFO on every start, save and read: a
        # launcher's output is its own lines and warnings unless the user asks for more (-v 0).
        logging.set_verbosity(logging.WARNING)
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        return main()
    except UserError as error:
        _exit(error, str(error))


def _parse_flags(argv):
    """absl's flag parsing, with every way a flag or config key can be wrong reported in one line."""
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:  # unknown flag, bad value, a config file that raised (with its traceback)
        _exit(error, str(error))
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a key the config lacks
        message = _unknown_key_message(error, argv)
        if message is None:
            raise
        _exit(error, message)
    if "config" in flags.FLAGS and flags.FLAGS.config is not None:
        try:
            flags.FLAGS.config.keys()
        except OSError as error:  # ml_collections defers a config file it cannot read to its first use
            _exit(error, f"--config: {str(error).splitlines()[-1].strip()}")
    return remaining


def _unknown_key_message(error, argv):
    """`--config.data.raw_dirr: no such config key 'raw_dirr'. Did you mean "raw_dir" ...?`, or None
    when no `--<flag>.<path>` argument names the missing key (then the error is not the user's)."""
    text = error
    while isinstance(text, BaseException):  # AttributeError(KeyError("'key'\nDid you mean ...?"))
        text = text.args[0] if text.args else ""
    key, *hint = [line.strip() for line in str(text).splitlines()] or [""]
    key = key.strip("'\"")
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("--") and "." in name and key in name.split("."):
            return " ".join([f"--{name}: no such config key {key!r}.", *hint])
    return None


def _can_be_directory(path):
    """True unless `path`, or the nearest of its parents that exists, is not a directory."""
    if path is None:
        return True
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path)


def _one_line(message):
    """The first and last non-blank lines of `message` (absl puts a config file's traceback between)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[1:][-1:])


def _exit(error, message):
    """Prints the one-line `message` and exits with USER_ERROR_STATUS; under TPAD_VERBOSE=1 re-raises."""
    if os.environ.get(VERBOSE_ENV, "0") not in ("", "0"):
        raise error
    print(f"{os.path.basename(sys.argv[0])}: error: {_one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)
