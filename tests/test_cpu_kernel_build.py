"""The C++ kernel's build, cache and trust model (lion_hf/optim/cpu_kernel_build.py): what this user
built is loaded; a planted, foreign, world-writable, truncated or garbage library never is; a
failed or hung build falls back to foreach with a warning and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from lion_hf.optim import cpu_kernel, cpu_kernel_build, dispatch
from lion_hf.optim.cpu_kernel_build import cxx_compiler, library_path, load_library
from lion_hf.optim.dispatch import impl_unavailable, resolve_impl
from lion_hf.optim.lion import lion

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="needs a C++ compiler")
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="planting a file owned by another user needs root (chown)")
OTHER_UID = 4242

# A library with the kernel's entry point that does nothing, and a constructor that runs at load
# time and leaves a marker file: what a planted library could do inside a training process.
PLANTED_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char* path = getenv("LION_HF_TEST_MARKER");
  FILE* f = path ? fopen(path, "w") : NULL;
  if (f) { fputs("the planted constructor ran", f); fclose(f); }
}
int64_t lion_hf_cpu_step(void) { return 0; }
"""


def _cpp_step_in_a_new_process(numel: int, *, timeout: float) -> subprocess.CompletedProcess:
    """One impl='cpp' step of ``numel`` elements in a fresh process (nothing loaded yet), which
    prints the warnings it raised and checks that the weights moved; it must exit cleanly."""
    script = ("import torch, warnings\nfrom lion_hf.optim.lion import lion\n"
              f"p, g, m = [torch.ones({numel})], [torch.ones({numel})], [torch.zeros({numel})]\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    lion(p, g, m, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl='cpp')\n"
              "print([str(w.message) for w in caught])\n"
              f"assert torch.equal(p[0], torch.full(({numel},), 0.5)), p\n")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """No kernel loaded yet in this process, an empty cache, and a marker path for planted code."""
    for name in ("_loaded", "_kernel", "_sign_vote", "build_failure"):
        monkeypatch.setattr(cpu_kernel, name, None)
    monkeypatch.setenv("LION_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LION_HF_TEST_MARKER", str(tmp_path / "marker"))
    return tmp_path


def _planted_library(tmp_path: Path) -> bytes:
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_SOURCE)
    built = tmp_path / "planted.so"
    subprocess.run([cxx_compiler(), "-x", "c", "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    return built.read_bytes()


def _plant(path: Path, library: bytes, *, uid: int | None = None, mode: int = 0o700) -> None:
    """Put ``library`` where the cache would look, with a matching checksum record, so that only
    the ownership and mode checks can stop it."""
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(library)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(library).hexdigest())
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)


def _step_is_correct() -> bool:
    p, g, m = [torch.ones(10)], [torch.ones(10)], [torch.zeros(10)]
    lion(p, g, m, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl="cpp")
    return torch.equal(p[0], torch.full((10,), 0.5))


def test_the_library_is_built_once_and_then_read_from_the_cache_without_running_the_compiler(fresh_cache,
                                                                                              monkeypatch):
    load_library()
    path = library_path(cxx_compiler())
    assert path.exists() and path.parent == fresh_cache / "cache"
    assert (path.stat().st_mode & 0o777) == 0o700 and ((fresh_cache / "cache").stat().st_mode & 0o777) == 0o700

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached library should have been used, with no compiler run")

    monkeypatch.setattr(subprocess, "Popen", no_compiler)
    monkeypatch.setattr(subprocess, "run", no_compiler)
    load_library()
    assert _step_is_correct()


@as_root
def test_a_library_planted_by_another_user_is_never_loaded(fresh_cache):
    path = library_path(cxx_compiler())
    _plant(path, _planted_library(fresh_cache), uid=OTHER_UID)
    with pytest.warns(UserWarning, match=rf"{path.name} is not loaded: it is owned by uid {OTHER_UID}"):
        assert _step_is_correct()
    assert not (fresh_cache / "marker").exists(), "the planted library's constructor ran"
    assert path.stat().st_uid == os.getuid(), "the cache should hold this user's own rebuild"


def test_a_world_writable_library_is_never_loaded(fresh_cache):
    path = library_path(cxx_compiler())
    _plant(path, _planted_library(fresh_cache), mode=0o777)
    with pytest.warns(UserWarning, match="is not loaded: it can be written by others"):
        assert _step_is_correct()
    assert not (fresh_cache / "marker").exists()


@pytest.mark.parametrize("folder", ["world_writable", pytest.param("foreign", marks=as_root)])
def test_a_shared_or_foreign_cache_folder_is_refused_for_a_private_one(fresh_cache, folder):
    shared = fresh_cache / "cache"
    shared.mkdir(mode=0o700)
    if folder == "world_writable":
        os.chmod(shared, 0o1777)  # a cluster's shared /tmp-like folder
        reason = "can be written by others"
    else:
        os.chown(shared, OTHER_UID, -1)
        reason = f"owned by uid {OTHER_UID}"
    # Even a library that passes every file check is not loaded from such a folder.
    _plant(library_path(cxx_compiler(), shared), _planted_library(fresh_cache))
    with pytest.warns(UserWarning, match=rf"cache {shared} is not used: it .*{reason}.*private folder (\S+) instead"):
        assert _step_is_correct()
    assert not (fresh_cache / "marker").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the record still holds the whole library's checksum


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_record"])
def test_a_damaged_library_is_rebuilt_once_and_never_crashes_the_process(fresh_cache, damage):
    """In a subprocess: before the checksum a truncated library killed every process with a bus
    error on its first step."""
    load_library()
    path = library_path(cxx_compiler())
    if damage == "truncated":
        _truncate(path)
    elif damage == "garbage":
        path.write_bytes(b"not a library")
    else:
        path.with_name(path.name + ".sha256").unlink()
    result = _cpp_step_in_a_new_process(100000, timeout=300)
    assert "is not loaded" in result.stdout and "Rebuilding it" in result.stdout
    assert load_library() is not None  # the rebuild is whole: it loads here too, without a warning


def test_a_failed_build_warns_once_and_the_step_runs_in_foreach(fresh_cache, monkeypatch):
    broken = fresh_cache / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'simulated compiler error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    with pytest.warns(UserWarning, match="impl='cpp' is unavailable.*simulated compiler error"):
        assert _step_is_correct()
    assert "simulated compiler error" in impl_unavailable("cpp", "cpu")
    assert resolve_impl("auto", "cpu") == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _step_is_correct()  # no second build, no second warning


def test_a_hung_build_is_killed_in_time_and_leaves_nothing_behind(fresh_cache, monkeypatch):
    hung = fresh_cache / "hung-cxx"
    pid_file = fresh_cache / "child.pid"
    # The compiler forks a child (as g++ forks cc1plus) and both hang.
    hung.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pid_file}\nsleep 60\n")
    hung.chmod(0o755)
    monkeypatch.setenv("CXX", str(hung))
    monkeypatch.setattr(cpu_kernel_build, "BUILD_TIMEOUT_S", 2)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="did not build cpu_kernel.cpp within 2 s"):
        assert _step_is_correct()
    assert time.monotonic() - start < 20
    assert not [p.name for p in (fresh_cache / "cache").iterdir()], "a killed build left files behind"
    child = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until its new parent reaps it
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the compiler's child process survived the timeout")


def test_a_leftover_of_a_dead_builder_on_this_host_is_removed_at_the_next_load(fresh_cache):
    """A pid means something only on its own host: another host's leftover (a home folder shared
    over NFS) is left alone, as is a live process's."""
    folder = fresh_cache / "cache"
    folder.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = library_path(cxx_compiler(), folder).name
    host = cpu_kernel_build._host_tag()
    leftover = folder / f".{name}.{host}.{dead.pid}.tmp"
    record_leftover = folder / f".{name}.sha256.{host}.{dead.pid}.tmp"
    elsewhere = folder / f".{name}.{host}x.{dead.pid}.tmp"
    alive = folder / f".{name}.{host}.{os.getppid()}.tmp"
    for path in (leftover, record_leftover, elsewhere, alive):
        path.write_bytes(b"half a library")
    assert _step_is_correct()
    assert not leftover.exists() and not record_leftover.exists()
    assert elsewhere.exists() and alive.exists()
    elsewhere.unlink()
    alive.unlink()
    dead_again = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_again.wait()
    late = folder / f".{name}.{host}.{dead_again.pid}.tmp"
    late.write_bytes(b"half a library")
    load_library()  # a load from the cache, with no build: it sweeps too
    assert not late.exists()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts descriptors in /proc/self/fd")
def test_a_record_that_is_not_text_is_a_mismatch_and_leaks_no_descriptor(fresh_cache):
    """Non-UTF-8 bytes in the .sha256 record used to raise UnicodeDecodeError at every step (and
    leak the library's descriptor each time)."""
    load_library()
    path = library_path(cxx_compiler())
    record = path.with_name(path.name + ".sha256")
    record.write_bytes(b"\xff\xfe\x00 not a digest \x80")
    before = _open_fds()
    for _ in range(5):
        fd, why = cpu_kernel_build._open_checked(path)
        assert fd is None and "checksum record is missing or unreadable" in why
    assert _open_fds() == before
    with pytest.warns(UserWarning, match="checksum record is missing or unreadable. Rebuilding it"):
        assert _step_is_correct()
    assert len(record.read_text()) == 64


@pytest.mark.parametrize("which", ["library", "record"])
def test_a_fifo_in_place_of_the_library_or_its_record_is_refused_without_hanging(fresh_cache, which):
    load_library()
    path = library_path(cxx_compiler())
    target = path if which == "library" else path.with_name(path.name + ".sha256")
    target.unlink()
    os.mkfifo(target, 0o600)  # opening it for reading would wait for a writer forever
    result = _cpp_step_in_a_new_process(10, timeout=200)
    reason = "it is not a regular file" if which == "library" else "checksum record is missing or unreadable"
    assert reason in result.stdout and "Rebuilding it" in result.stdout
    assert target.is_file()


def test_any_exception_while_loading_falls_back_to_foreach_with_a_warning(fresh_cache, monkeypatch):
    def broken():
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")

    monkeypatch.setattr(cpu_kernel_build, "load_library", broken)
    with pytest.warns(UserWarning, match="impl='cpp' is unavailable.*simulated"):
        assert _step_is_correct()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _step_is_correct()  # recorded once: no second attempt, no raise on a step


def test_the_private_fallback_folder_is_removed_once_the_library_is_loaded(fresh_cache, monkeypatch):
    shared = fresh_cache / "cache"
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o1777)
    made = []
    original = cpu_kernel_build._private_folder
    monkeypatch.setattr(cpu_kernel_build, "_private_folder", lambda: made.append(original()) or made[-1])
    with pytest.warns(UserWarning, match="is not used"):
        assert _step_is_correct()
    assert len(made) == 1 and not made[0].exists(), "the private folder was left behind"
    assert _step_is_correct()  # the loaded library keeps working without its file


def _fake_compiler(folder: Path, body: str) -> Path:
    cxx = folder / "slow-cxx"
    cxx.write_text(f"#!/bin/sh\n{body}\n")
    cxx.chmod(0o755)
    return cxx


def _wait_gone(pid: int) -> bool:
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_an_interrupted_build_kills_the_compiler_and_removes_its_temporary_file(fresh_cache, monkeypatch):
    """A KeyboardInterrupt (or SystemExit) mid-build used to leave the compiler running and its
    temporary output behind."""
    pid_file = fresh_cache / "child.pid"
    # Writes its output file as a compiler does, forks a child, and hangs.
    cxx = _fake_compiler(fresh_cache, f'for a; do out="$a"; done\necho partial > "$out"\nsleep 60 &\n'
                                      f"echo $! > {pid_file}\nsleep 60")
    folder = fresh_cache / "cache"
    folder.mkdir(mode=0o700)
    path = library_path(str(cxx), folder)
    real_popen = subprocess.Popen

    class InterruptedPopen(real_popen):
        def communicate(self, *args, **kwargs):
            if kwargs.get("timeout") is not None:
                for _ in range(100):
                    if pid_file.exists() and pid_file.read_text().strip():
                        break
                    time.sleep(0.05)
                raise KeyboardInterrupt
            return super().communicate(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", InterruptedPopen)
    with pytest.raises(KeyboardInterrupt):
        cpu_kernel_build._build(str(cxx), path)
    assert _wait_gone(int(pid_file.read_text())), "the compiler's child survived the interrupt"
    assert not [p.name for p in folder.iterdir()], "an interrupted build left files behind"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_compiler_dies_with_the_process_that_started_it(fresh_cache):
    """A training process killed mid-build (SIGKILL, the OOM killer) runs no handler: the kernel
    kills the compiler (PR_SET_PDEATHSIG)."""
    pid_file = fresh_cache / "compiler.pid"
    cxx = _fake_compiler(fresh_cache, f"echo $$ > {pid_file}\nexec sleep 60")
    script = ("import sys\nfrom pathlib import Path\nfrom lion_hf.optim import cpu_kernel_build\n"
              f"cpu_kernel_build._build({str(cxx)!r}, Path({str(fresh_cache / 'lib.so')!r}))\n")
    builder = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.1)
    compiler = int(pid_file.read_text())
    builder.kill()
    builder.wait()
    assert _wait_gone(compiler), "the compiler outlived the process that started it"


def test_processes_building_at_once_all_load_a_whole_library(tmp_path):
    """Ranks of one job build into the same cache at the same time."""
    script = ("import torch\nfrom lion_hf.optim.lion import lion\n"
              "p, g, m = [torch.ones(10)], [torch.ones(10)], [torch.zeros(10)]\n"
              "lion(p, g, m, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl='cpp')\n"
              "assert torch.equal(p[0], torch.full((10,), 0.5)), p\n")
    env = {**os.environ, "LION_HF_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-W", "error::UserWarning", "-c", script], env=env,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith(".so") and names[1] == names[0] + ".sha256", names


def test_auto_does_not_probe_the_compiler_on_every_step(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "cxx_compiler", lambda: calls.append(1) or "g++")
    dispatch._compiler_found.cache_clear()
    for _ in range(3):
        resolve_impl("auto", "cpu")
    dispatch._compiler_found.cache_clear()
    assert len(calls) == 1
