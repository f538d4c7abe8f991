"""A real tritonserver for the tests: the one the nvidia-pytriton wheel bundles, in its own environment.

Test-only. The wheel's server (2.51) has the Python backend, not the onnxruntime or TensorRT ones; the
test backend in triton_backend/model.py stands in for onnxruntime as a Python-based backend, so an
exported repository loads unchanged. The server's Python side (the Python backend's stub, which runs the
router and the test backend) needs numpy < 2 (with numpy 2 every output comes back empty), so it runs in
a virtual environment of its own, made once and kept (`MASKOPT_TRITON_ENV`, default
~/.cache/maskopt/triton-env): numpy < 2, onnxruntime, and the wheel without its client-side dependencies.

    env = server_env()                      # makes or finds the environment; None (and why) if it cannot
    with TritonServer(env, repository) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

PYTRITON = "nvidia-pytriton==0.7.0"
TEST_BACKEND = Path(__file__).parent / "triton_backend" / "model.py"
READY_TIMEOUT_S = 120  # 4 router and 3 variant stubs start on 2 cores
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def server_packages() -> list[str]:
    # the test side's ONNX Runtime version: the server's variants compute what the tests compare with
    import onnxruntime

    return ["numpy<2", f"onnxruntime=={onnxruntime.__version__}"]


def env_dir() -> Path:
    default = Path.home() / ".cache" / "maskopt" / f"triton-env-py{PY}"
    return Path(os.environ.get("MASKOPT_TRITON_ENV", default))


def _recipe() -> dict:
    """What an environment was made from: rebuilt when any of it changes."""
    return {"python": sys.version, "executable": sys.executable, "packages": server_packages(), "server": PYTRITON}


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def server_env() -> tuple[Path | None, str]:
    """The server's environment, made if missing or stale: (its folder, "") or (None, why it cannot be had).

    Built in a sibling folder and renamed into place, so an interrupted build leaves nothing half-made
    where a later run would trust it; a folder there that this harness did not make is never deleted."""
    env = env_dir()
    marker = env / ".maskopt-ready"
    if marker.is_file():
        try:
            made_from = json.loads(marker.read_text())
        except ValueError:
            made_from = None
        if made_from == _recipe():
            return _usable(env)
        shutil.rmtree(env)  # ours (it has our marker), made by another Python or other pins
    elif env.exists():
        return None, f"{env} exists and was not made by tests/triton_server.py: remove it or set MASKOPT_TRITON_ENV"
    env.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=env.name + ".build-", dir=env.parent))
    try:
        steps = [[sys.executable, "-m", "venv", "--clear", str(build)],
                 [str(build / "bin" / "pip"), "install", "-q", *server_packages()],
                 [str(build / "bin" / "pip"), "install", "-q", "--no-deps", PYTRITON]]
        for cmd in steps:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                return None, f"{' '.join(cmd[:4])}: {e}"
            if r.returncode != 0:
                return None, f"{' '.join(cmd[:4])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
        # marked, then renamed into place in one step: a half-made environment is never where one is looked for.
        # (Its pip scripts keep the build path; nothing uses them. Its python finds pyvenv.cfg beside itself.)
        (build / ".maskopt-ready").write_text(json.dumps(_recipe()))
        try:
            os.rename(build, env)
        except OSError:  # another run put one there first
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _usable(env)


def _usable(env: Path) -> tuple[Path | None, str]:
    why = _check_stub(env)
    return (None, why) if why else (env, "")


def _stub(env: Path) -> Path:
    return _site_packages(env) / "pytriton" / "tritonserver" / "python_backend_stubs" / PY / "triton_python_backend_stub"


def _library_path(env: Path) -> str:
    """The wheel's libraries, this Python's libpython (the stub embeds one), then whatever was set already."""
    parts = [str(_site_packages(env) / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or "",
             os.environ.get("LD_LIBRARY_PATH", "")]
    return ":".join(p for p in parts if p)


def _check_stub(env: Path) -> str:
    """'' if the Python backend's stub for this Python can start here, else why not (the env itself is kept)."""
    stub = _stub(env)
    if not stub.is_file():
        return f"the wheel has no Python backend stub for Python {PY}"
    try:
        r = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "LD_LIBRARY_PATH": _library_path(env)})
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot check the Python backend stub's libraries (ldd: {e})"
    missing = [line.split()[0] for line in r.stdout.splitlines() if "not found" in line]
    return f"the Python backend stub cannot find {', '.join(missing)}" if missing else ""


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now (a race with other processes remains: the server start is retried)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_port() -> int:
    return _free_ports(1)[0]


class TritonServer:
    """tritonserver on `repository`, on free localhost ports; started on enter, always stopped (its process
    group, by its pid) on exit."""

    def __init__(self, env: Path, repository: Path) -> None:
        self.env, self.repository = env, Path(repository)
        self.proc: subprocess.Popen | None = None
        self.log = ""
        self.http_url = self.grpc_url = ""

    def _backends(self, root: Path) -> Path:
        """The backends folder: the wheel's Python backend with the stub for this Python, and the test onnxruntime."""
        server = _site_packages(self.env) / "pytriton" / "tritonserver"
        python = root / "python"
        python.mkdir(parents=True)
        for f in (server / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, python / f.name)
        shutil.copy2(_stub(self.env), python / "triton_python_backend_stub")
        (root / "onnxruntime").mkdir()
        shutil.copy2(TEST_BACKEND, root / "onnxruntime" / "model.py")
        return root

    def __enter__(self) -> "TritonServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="maskopt-triton-")
        try:
            tmp = Path(self._tmp.name)
            self._backends_dir = self._backends(tmp / "backends")
            for attempt in range(3):  # a port taken between choosing it and the server binding it: new ports
                self._log_path = tmp / f"server-{attempt}.log"
                if self._start():
                    return self
            raise RuntimeError(f"tritonserver could not bind its ports:\n{self.read_log()[-3000:]}")
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> bool:
        """Start on fresh ports and wait until ready; False if the ports were taken (then try again)."""
        http, grpc = _free_ports(2)
        self.http_url, self.grpc_url = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        site = _site_packages(self.env)
        env = {**os.environ, "PATH": f"{self.env / 'bin'}:{os.environ.get('PATH', '')}",
               "LD_LIBRARY_PATH": _library_path(self.env), "PYTHONNOUSERSITE": "1"}
        for name in ("PYTHONPATH", "PYTHONHOME"):  # the stub's Python must see the server environment only
            env.pop(name, None)
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
                 f"--model-repository={self.repository}", f"--backend-directory={self._backends_dir}",
                 "--http-address=127.0.0.1", f"--http-port={http}",
                 "--allow-grpc=true", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
                 "--allow-metrics=false", "--exit-on-error=true", "--log-verbose=0"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "already in use" in self.read_log():
                    self._stop()
                    return False
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}):\n{self.read_log()[-3000:]}")
            try:
                with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    # ours, not another server on a reused port: its log says it serves there
                    log = self.read_log()
                    if r.status == 200 and f"HTTPService at 127.0.0.1:{http}" in log and f"127.0.0.1:{grpc}" in log:
                        return True
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        path = getattr(self, "_log_path", None)
        return path.read_text(errors="replace") if path is not None and path.is_file() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its Python stubs: its own process group
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left, stubs included
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        try:
            self._stop()
            self.log = self.read_log()
        finally:
            self._tmp.cleanup()
