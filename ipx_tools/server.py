"""A headless ComfyUI server in a subprocess, on loopback, with this pack as its only custom node pack, driven over
its HTTP API (POST /prompt, GET /history/{id}, GET /view, POST /upload/image). Standard library only.

ComfyClient talks to any ComfyUI URL; ComfyServer is a ComfyClient that also starts and stops the server.

    with ComfyServer(host_path, models_dir, work_dir) as server:
        prompt_id = server.queue_prompt(graph)          # PromptRejected (HTTP 400, with the JSON) if invalid
        entry = server.wait(prompt_id, timeout=300)     # the /history entry once the prompt has finished
        error = execution_error(entry)                  # None, or the host's execution_error message
        png = server.fetch_image(**output_images(entry)[0])

The work folder receives input/, output/, temp/, user/, custom_nodes/<pack name> (a symlink to the pack),
extra_model_paths.yaml and server.log. Failures to start, a server that dies, and timeouts raise ServerError with the
tail of the log in the message.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-ipadapter-ipx"
LOOPBACK = "127.0.0.1"
MODEL_FOLDERS = ("checkpoints", "clip_vision", "ipadapter")


class ServerError(RuntimeError):
    """The server could not start, died, timed out, or answered an unexpected status."""


class PromptRejected(ServerError):
    """POST /prompt answered 400: the graph did not validate. ``response`` is the JSON the host sent
    ({"error": {...}, "node_errors": {node id: {"class_type", "errors": [...]}}})."""

    def __init__(self, response: dict):
        self.response = response
        super().__init__(format_rejection(response))


class PromptFailed(ServerError):
    """The prompt ran and a node raised. ``error`` is the host's execution_error message (node_id, node_type,
    exception_type, exception_message, traceback, ...); ``entry`` the whole /history entry."""

    def __init__(self, error: dict, entry: dict):
        self.error = error
        self.entry = entry
        super().__init__(f"node {error.get('node_id')} ({error.get('node_type')}) failed: "
                         f"{error.get('exception_type')}: {str(error.get('exception_message', '')).strip()}")


# --- reading /prompt and /history answers ----------------------------------------------------------------------------

def format_rejection(response: dict) -> str:
    error = response.get("error") or {}
    lines = [f"prompt rejected: {error.get('message', error) if isinstance(error, dict) else error}"]
    for node_id, node in (response.get("node_errors") or {}).items():
        for item in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type')}): {item.get('message')}: {item.get('details')}")
    return "\n".join(lines)


def status_messages(entry: dict) -> list:
    """[(event, data), ...] that the executor recorded for this prompt (execution_start, execution_cached,
    execution_success or execution_error / execution_interrupted)."""
    return [tuple(m) for m in ((entry or {}).get("status") or {}).get("messages", [])]


def execution_error(entry: dict):
    """The execution_error message of a finished prompt, or None if it succeeded."""
    for event, data in status_messages(entry):
        if event == "execution_error":
            return data
    return None


def output_images(entry: dict) -> list:
    """[{"filename", "subfolder", "type"}, ...] of every image the prompt's output nodes reported."""
    images = []
    for node_output in ((entry or {}).get("outputs") or {}).values():
        images.extend(node_output.get("images", []))
    return images


# --- the server ------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def write_extra_model_paths(path, models_dir, custom_nodes_dir, folders=MODEL_FOLDERS) -> Path:
    """An extra_model_paths.yaml mapping ``folders`` to subfolders of ``models_dir`` and custom_nodes to
    ``custom_nodes_dir``. Values are written as JSON strings, which YAML reads verbatim (spaces, colons...)."""
    lines = ["ipx_server:", f"    base_path: {json.dumps(str(Path(models_dir).resolve()))}"]
    lines += [f"    {name}: {json.dumps(name)}" for name in folders]
    lines.append(f"    custom_nodes: {json.dumps(str(Path(custom_nodes_dir).resolve()))}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


class ComfyClient:
    """The HTTP API of a running ComfyUI at ``url`` (e.g. http://127.0.0.1:8188)."""

    def __init__(self, url: str):
        self._url = url.rstrip("/")

    @property
    def url(self) -> str:
        return self._url

    def _check_alive(self) -> None:
        """Hook: ComfyServer raises here (with its log) when its process has died."""

    def _tail_text(self) -> str:
        return ""

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60,
                content_type: str = "application/json"):
        """(status, body bytes). HTTP error statuses are returned, not raised; connection errors raise OSError."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str, timeout: float = 60):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def queue_prompt(self, graph: dict, client_id: str | None = None) -> str:
        """POST an API-format graph; return its prompt_id. A graph the host rejects raises PromptRejected carrying
        the host's error JSON (``.response``)."""
        payload = {"prompt": graph}
        if client_id:
            payload["client_id"] = client_id
        status, body = self.request("POST", "/prompt", json.dumps(payload).encode("utf-8"))
        if status == 400:
            raise PromptRejected(json.loads(body))
        if status != 200:
            raise ServerError(f"POST /prompt answered {status}: {body[:1000]!r}{self._tail_text()}")
        return json.loads(body)["prompt_id"]

    def history(self, prompt_id: str):
        """The /history entry of a finished prompt, or None while it is queued or running."""
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.2) -> dict:
        """Poll GET /history/{prompt_id} until the prompt has finished (successfully or not); return its entry."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            entry = self.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("completed") is not None:
                return entry
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s{self._tail_text()}")
            time.sleep(poll)

    def run(self, graph: dict, timeout: float = 300, check: bool = True) -> dict:
        """queue_prompt + wait. With ``check``, a node's exception raises PromptFailed."""
        entry = self.wait(self.queue_prompt(graph), timeout)
        if check:
            self.raise_for_error(entry)
        return entry

    def raise_for_error(self, entry: dict) -> None:
        """Raise PromptFailed if the finished prompt's /history ``entry`` records an execution error."""
        error = execution_error(entry)
        if error is not None:
            raise PromptFailed(error, entry)

    def upload_image(self, image, name: str | None = None, overwrite: bool = True) -> str:
        """POST /upload/image: ``image`` is a path or bytes; returns the name LoadImage reads it by."""
        if isinstance(image, (bytes, bytearray)):
            data, name = bytes(image), name or "ipx-upload.png"
        else:
            data, name = Path(image).read_bytes(), name or Path(image).name
        boundary = f"----ipx{uuid.uuid4().hex}"
        fields = [("overwrite", None, b"true" if overwrite else b"false"), ("type", None, b"input"),
                  ("image", name, data)]
        body = b""
        for field, filename, value in fields:
            disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
            body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                     + ("Content-Type: application/octet-stream\r\n" if filename else "") + "\r\n").encode()
            body += value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        status, answer = self.request("POST", "/upload/image", body,
                                      content_type=f"multipart/form-data; boundary={boundary}")
        if status != 200:
            raise ServerError(f"POST /upload/image answered {status}: {answer[:500]!r}")
        result = json.loads(answer)
        return f"{result['subfolder']}/{result['name']}" if result.get("subfolder") else result["name"]

    def fetch_image(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of an image the server saved (GET /view)."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, body = self.request("GET", f"/view?{query}")
        if status != 200:
            raise ServerError(f"GET /view?{query} answered {status}")
        return body


class ComfyServer(ComfyClient):
    """ComfyUI at ``host_path`` (its main.py) run by ``python`` (default: this interpreter) on 127.0.0.1 with models
    from ``models_dir`` and this pack loaded from ``work_dir/custom_nodes``. Other custom node packs are not loaded
    (--disable-all-custom-nodes --whitelist-custom-nodes <pack name>) unless ``only_this_pack`` is False. Without
    ``work_dir``, a temporary folder is used (and kept: it holds the outputs and the log)."""

    def __init__(self, host_path, models_dir, work_dir=None, *, python=None, pack_dir=PACK_DIR, pack_name=PACK_NAME,
                 port=None, cpu=True, only_this_pack=True, model_folders=MODEL_FOLDERS, extra_args=()):
        super().__init__("")
        self.host_path = Path(host_path).resolve()
        self.models_dir = Path(models_dir).resolve()
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="ipx-comfyui-"))
        self.python = python or sys.executable
        self.pack_dir = Path(pack_dir).resolve()
        self.pack_name = pack_name
        self.port = port
        self.cpu = cpu
        self.only_this_pack = only_this_pack
        self.model_folders = tuple(model_folders)
        self.extra_args = list(extra_args)
        self.input_dir = self.work_dir / "input"
        self.output_dir = self.work_dir / "output"
        self.log_path = self.work_dir / "server.log"
        self.process = None
        self.startup_s = None
        self.object_info_at_start = None
        self._log_file = None

    # -- lifecycle --

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list:
        cmd = [self.python, "main.py", "--listen", LOOPBACK, "--port", str(self.port),
               "--extra-model-paths-config", str(self.work_dir / "extra_model_paths.yaml"),
               "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
               "--temp-directory", str(self.work_dir / "temp"), "--user-directory", str(self.work_dir / "user"),
               "--database-url", f"sqlite:///{self.work_dir / 'user' / 'comfyui.db'}",
               "--disable-api-nodes"]
        if self.cpu:
            cmd.append("--cpu")
        if self.only_this_pack:
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", self.pack_name]
        return cmd + self.extra_args

    def _prepare(self) -> None:
        for sub in ("input", "output", "temp", "user", "custom_nodes"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.work_dir / "custom_nodes" / self.pack_name
        if link.is_symlink() or link.exists():
            if link.resolve() != self.pack_dir:
                raise ServerError(f"{link} exists and is not a link to {self.pack_dir}")
        else:
            link.symlink_to(self.pack_dir, target_is_directory=True)
        write_extra_model_paths(self.work_dir / "extra_model_paths.yaml", self.models_dir,
                                self.work_dir / "custom_nodes", self.model_folders)

    def start(self, timeout: float = 180) -> "ComfyServer":
        """Start the server and wait until GET /object_info answers (the nodes, this pack's included, are loaded)."""
        if self.process is not None:
            raise ServerError("already started")
        if not (self.host_path / "main.py").is_file():
            raise ServerError(f"{self.host_path} is not a ComfyUI folder (no main.py)")
        self._prepare()
        self.port = self.port or free_port()
        self._log_file = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        started = time.monotonic()
        self.process = subprocess.Popen(self.command(), cwd=self.host_path, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        while True:
            if self.process.poll() is not None:
                self._close_log()
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting"
                                  f"{self._tail_text()}")
            try:
                self.object_info_at_start = self.get_json("/object_info", timeout=30)
                break
            except (OSError, ServerError):
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise ServerError(f"ComfyUI did not answer GET /object_info within {timeout:.0f} s{self._tail_text()}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - started
        return self

    def stop(self, timeout: float = 20) -> None:
        """Stop the server (SIGINT, then SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- the log --

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _tail_text(self) -> str:
        return f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"

    def _check_alive(self) -> None:
        if self.process is None:
            raise ServerError("the server is not running")
        if self.process.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.process.returncode}{self._tail_text()}")
