"""Build, cache and load the C++ kernel of ``impl="cpp"`` (``cpu_kernel.cpp``), trusting only what
this user built.

The library is built at first use with the system's C++ compiler (``$CXX``, else ``g++``, else
``c++``) for this CPU (``-march=native``) and cached in ``$LION_HF_CACHE``, else
``$XDG_CACHE_HOME/lion_hf`` or ``~/.cache/lion_hf``. Its file name hashes everything the build
depends on: the source, the compiler (its resolved path, size and modification time, so that no
compiler runs just to look a library up), the flags and the CPU's feature flags.

Trust model (docs/implementations.md says it for users):

* A cache folder is used only if this user owns it and neither group nor others can write to it;
  it is created with mode 0700. Any other folder (a shared ``/tmp`` path, a folder another user
  planted or made world-writable) is refused with a warning naming it, and the library is built
  into a fresh private folder of this process instead.
* A library is loaded only if this user owns it, nobody else can write to it, and its SHA-256
  matches the one recorded beside it when it was built. The file is opened once, checked and
  hashed through that descriptor, and loaded through the same descriptor, so it cannot be
  swapped between the check and the load.
* A library that fails any check (truncated, corrupt, foreign, without its record) or fails to
  load is deleted and rebuilt once; if that fails too, the cpp impl is unavailable in this
  process and the step runs in ``foreach``, with a warning. Nothing is loaded unchecked, and a
  bad cache never crashes the process.
* Time limits: the build gets :data:`BUILD_TIMEOUT_S` seconds, after which the compiler's whole
  process group is killed; so is it when the build is interrupted (KeyboardInterrupt,
  SystemExit), and on Linux the compiler is also killed when the process that started it dies.
  Each build writes into a temporary file of its own (named after its host and pid), renamed
  into place when complete (processes that build at once never load a partial file); a leftover
  of a dead builder on this host is removed at the next load.
* Nothing read from the cache can hang or break a step: the library and its record are opened
  without blocking (a FIFO in their place is refused, not waited on) and must be regular files;
  a record that is not ASCII hex is a mismatch; every descriptor is closed.
* A private fallback folder is removed once its library is loaded (the mapping stays valid).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["BUILD_TIMEOUT_S", "FLAGS", "SOURCE", "cache_dir", "cxx_compiler", "library_path", "load_library"]

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -ffp-contract=off: no product is fused into an FMA, so every result rounds as torch's separate
# ops round it (the step is bit for bit impl="for_loop"'s). -march=native: vectorised for this CPU,
# and -mprefer-vector-width=512 lets the compiler use its widest vectors where it would otherwise
# prefer narrower ones (a CPU without them ignores it). -fno-trapping-math: nothing reads
# floating-point exception flags, and without it selects on float comparisons stay scalar; it
# changes no value (no reassociation, no fast-math).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-trapping-math",
         "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# The build takes seconds; a compiler that hangs must not hang training for long.
BUILD_TIMEOUT_S = 120

_RECORD_SUFFIX = ".sha256"
_TEMP_SUFFIX = ".tmp"


def cxx_compiler() -> str | None:
    """The C++ compiler the build uses: ``$CXX``, else g++, else c++ (None if none is on the PATH)."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cache_dir() -> Path:
    root = os.environ.get("LION_HF_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lion_hf"


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler_identity(cxx: str) -> str:
    """The compiler as a cache key, without running it: its resolved path, size and mtime."""
    real = os.path.realpath(cxx)
    try:
        info = os.stat(real)
    except OSError:
        return real
    return f"{real}:{info.st_size}:{info.st_mtime_ns}"


def library_path(cxx: str, folder: Path | None = None) -> Path:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_identity(cxx).encode(), " ".join(FLAGS).encode(),
                 _cpu_features().encode()):
        digest.update(part)
        digest.update(b"\0")
    return (cache_dir() if folder is None else folder) / f"lion_cpu_kernel_{digest.hexdigest()[:24]}.so"


def _untrusted_because(info: os.stat_result, what: str) -> str | None:
    """Why a file or folder with this stat may not be trusted, or None."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{what} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} can be written by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def _trusted_folder(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700) if needed; why it cannot be trusted, or None."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(folder)
    except OSError as exc:
        return f"it cannot be used ({exc})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    return _untrusted_because(info, "it")


def _host_tag() -> str:
    """This host's name as a file-name part: a pid means something only on the host that gave it
    (a cache in a home folder shared over NFS is seen by several hosts)."""
    host = socket.gethostname() or "localhost"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in host)


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}{suffix}.{_host_tag()}.{os.getpid()}{_TEMP_SUFFIX}")


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete build leftovers (``.<name>.<host>.<pid>.tmp``) of processes of this host that no
    longer run; another host's are left alone (its pids mean nothing here)."""
    host = _host_tag()
    try:
        leftovers = list(folder.glob(f".*{_TEMP_SUFFIX}"))
    except OSError:
        return
    for leftover in leftovers:
        parts = leftover.name[: -len(_TEMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        except OSError:
            pass  # alive under another user, or not ours to ask about


def _die_with_parent_hook() -> object:
    """For the compiler's ``preexec_fn`` (Linux): SIGKILL when the parent dies, so that a training
    process killed mid-build (SIGKILL, the OOM killer) leaves no compiler running. ``prctl`` is
    looked up here, in the parent: between fork and exec (other threads' locks copied as they were)
    the child should do no more than call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return hook


def _build(cxx: str, path: Path) -> None:
    """Compile into a temporary file of this process, then record its hash and rename both into
    place (the record first: a library is never visible without it). Raises RuntimeError. An
    interrupted build (any BaseException) kills the compiler's process group and removes its
    temporary files before it propagates."""
    temp = _temporary(path)
    record_temp = _temporary(path, _RECORD_SUFFIX)
    command = [cxx, *FLAGS, str(SOURCE), "-o", str(temp)]
    try:
        compiler = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True,
                                    preexec_fn=_die_with_parent_hook())
        try:
            _, errors = compiler.communicate(timeout=BUILD_TIMEOUT_S)
        except BaseException as exc:  # the timeout, or KeyboardInterrupt / SystemExit mid-build
            try:
                os.killpg(compiler.pid, signal.SIGKILL)  # cc1plus, as and ld too
            except OSError:
                pass
            compiler.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise RuntimeError(f"{cxx} did not build {SOURCE.name} within {BUILD_TIMEOUT_S} s") from None
            raise
        finally:
            for stream in (compiler.stdout, compiler.stderr):
                if stream is not None:
                    stream.close()
        if compiler.returncode != 0:
            raise RuntimeError(f"{cxx} could not build {SOURCE.name}: {errors.strip()[-2000:]}")
        os.chmod(temp, 0o700)
        record_temp.write_text(hashlib.sha256(temp.read_bytes()).hexdigest())
        os.replace(record_temp, path.with_name(path.name + _RECORD_SUFFIX))
        os.replace(temp, path)
    except OSError as exc:
        raise RuntimeError(f"could not build {SOURCE.name} into {path.parent}: {exc}") from exc
    finally:
        temp.unlink(missing_ok=True)
        record_temp.unlink(missing_ok=True)


# Never wait on a FIFO or device put where a file is expected; never follow a symlink.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _open_regular(path: Path) -> int:
    """A descriptor of the regular file at ``path``, opened without blocking; raises OSError when
    it is absent, cannot be opened or is not a regular file (the descriptor is then closed)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _recorded_digest(path: Path) -> str | None:
    """The hex SHA-256 recorded beside the library, or None when it is missing, not a regular
    file, unreadable or not ASCII (a damaged record is a mismatch, never an exception)."""
    try:
        fd = _open_regular(path.with_name(path.name + _RECORD_SUFFIX))
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # 64 hex digits; anything longer is no record of ours
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


def _open_checked(path: Path) -> tuple[int | None, str | None]:
    """An open descriptor of the library at ``path`` once it passed every check, or the reason it
    did not (the descriptor is then closed, whatever went wrong)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None, "it does not exist"
    except OSError as exc:
        return None, f"it cannot be opened ({exc})"
    ok = False
    try:
        info = os.fstat(fd)
        reason = _untrusted_because(info, "it") if stat.S_ISREG(info.st_mode) else "it is not a regular file"
        if reason is None:
            recorded = _recorded_digest(path)
            digest = hashlib.sha256()
            with os.fdopen(os.dup(fd), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if recorded is None:
                reason = "its checksum record is missing or unreadable"
            elif digest.hexdigest() != recorded:
                reason = "its SHA-256 does not match the one recorded when it was built (truncated or changed)"
        ok = reason is None
    except OSError as exc:
        reason = f"it cannot be read ({exc})"
    finally:
        if not ok:  # closed on every way out but success, an unexpected exception included
            os.close(fd)
    return (fd, None) if ok else (None, reason)


def _load_checked(path: Path) -> tuple[ctypes.CDLL | None, str | None]:
    fd, reason = _open_checked(path)
    if fd is None:
        return None, reason
    try:
        # Through the checked descriptor where the system offers one: the file loaded is the one hashed.
        proc_path = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(proc_path if os.path.exists(proc_path) else str(path)), None
    except OSError as exc:
        return None, f"it failed to load ({exc})"
    finally:
        os.close(fd)


def _private_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="lion_hf_kernel_"))


def load_library() -> ctypes.CDLL:
    """The kernel's library: from the cache when it passes the checks, else built (once more at
    most). Raises RuntimeError saying why when it can be neither loaded nor built."""
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("impl='cpp' needs a C++ compiler (g++) on the PATH, or $CXX")
    folder = cache_dir()
    reason = _trusted_folder(folder)
    private = None
    if reason is not None:
        private = folder = _private_folder()
        warnings.warn(f"Lion: the kernel cache {cache_dir()} is not used: {reason}. Building into the private folder "
                      f"{private} instead (set LION_HF_CACHE to a folder only you can write to).", stacklevel=5)
    try:
        return _load_or_build(cxx, library_path(cxx, folder))
    finally:
        if private is not None:
            # Built for this process alone: a loaded library stays mapped after its file is gone,
            # and a folder per process would otherwise pile up in /tmp.
            shutil.rmtree(private, ignore_errors=True)


def _load_or_build(cxx: str, path: Path) -> ctypes.CDLL:
    _remove_stale_temporaries(path.parent)
    library, why = _load_checked(path)
    if library is not None:
        return library
    if why != "it does not exist":
        warnings.warn(f"Lion: the cached kernel {path} is not loaded: {why}. Rebuilding it.", stacklevel=6)
        for stale in (path, path.with_name(path.name + _RECORD_SUFFIX)):
            try:
                stale.unlink(missing_ok=True)
            except OSError:
                pass  # a folder in its place: the build's rename then fails with a reason
    _build(cxx, path)
    library, why = _load_checked(path)
    if library is None:
        raise RuntimeError(f"the kernel built at {path} is not loaded: {why}")
    return library
