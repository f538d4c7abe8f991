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

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PYTRITON = "nvidia-pytriton==0.7.0"
SERVER_PACKAGES = ["numpy<2", "onnxruntime"]
TEST_BACKEND = Path(__file__).parent / "triton_backend" / "model.py"
READY_TIMEOUT_S = 60


def env_dir() -> Path:
    return Path(os.environ.get("MASKOPT_TRITON_ENV", Path.home() / ".cache" / "maskopt" / "triton-env"))


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def server_env() -> tuple[Path | None, str]:
    """The server's environment, made if missing: (its folder, "") or (None, why it could not be made)."""
    env = env_dir()
    marker = env / ".maskopt-ready"
    if marker.is_file():
        return env, ""
    shutil.rmtree(env, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(env)],
             [str(env / "bin" / "pip"), "install", "-q", *SERVER_PACKAGES],
             [str(env / "bin" / "pip"), "install", "-q", "--no-deps", PYTRITON]]
    for cmd in steps:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{' '.join(cmd[:4])}: {e}"
        if r.returncode != 0:
            return None, f"{' '.join(cmd[:4])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    marker.write_text(PYTRITON + "\n")
    return env, ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver on `repository`, on free localhost ports; started on enter, always stopped (by its pid) on exit."""

    def __init__(self, env: Path, repository: Path) -> None:
        self.env, self.repository = env, Path(repository)
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.proc: subprocess.Popen | None = None
        self.log = ""

    def _backends(self, root: Path) -> Path:
        """The backends folder: the wheel's Python backend with the stub for this Python, and the test onnxruntime."""
        server = _site_packages(self.env) / "pytriton" / "tritonserver"
        python = root / "python"
        python.mkdir(parents=True)
        for f in (server / "backends" / "python").iterdir():
            if f.is_file():
                shutil.copy2(f, python / f.name)
        stub = server / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        shutil.copy2(stub, python / stub.name)
        (root / "onnxruntime").mkdir()
        shutil.copy2(TEST_BACKEND, root / "onnxruntime" / "model.py")
        return root

    def __enter__(self) -> "TritonServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="maskopt-triton-")
        tmp = Path(self._tmp.name)
        backends = self._backends(tmp / "backends")
        site = _site_packages(self.env)
        env = {**os.environ, "PATH": f"{self.env / 'bin'}:{os.environ.get('PATH', '')}",
               "LD_LIBRARY_PATH": str(site / "nvidia_pytriton.libs"), "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)  # the stub's Python must see the server environment only
        self._log = open(tmp / "server.log", "w+")
        self.proc = subprocess.Popen(
            [str(site / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
             f"--model-repository={self.repository}", f"--backend-directory={backends}",
             "--http-address=127.0.0.1", f"--http-port={self.http_port}",
             "--allow-grpc=true", "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
             "--allow-metrics=false", "--exit-on-error=true", "--log-verbose=0"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({self.proc.returncode}):\n{self.read_log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its Python stubs: its own process group
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log = self.read_log()
        self._log.close()
        self._tmp.cleanup()
