"""`bigml serve`: answer HTTP requests with a model directory until SIGTERM (or Ctrl-C).

    model.path --load_model--> ServedModel (what the task answers) --create_app--> FastAPI app
    --uvicorn, on a socket bound here--> requests, batched by DynamicBatcher

No run directory is kept (bigml/cli.py gives Hydra a scratch one): the server writes nothing but
logs to stderr. The socket is bound before the model loads, so a port in use is a one-line error
(exit 2) in a blink; uvicorn then serves on it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bigml.errors import ConfigError, DataError, UsageError

log = logging.getLogger("bigml")
API_KEY_ENV = "BIGML_API_KEY"


def _check(cfg: DictConfig) -> None:
    s = cfg.serve
    if not 0 <= int(s.port) <= 65535:
        raise ConfigError("serve.port", f"{s.port} is not a port number (0-65535; 0: any free port)")
    for key in ("max_batch_size", "workers", "max_tokens", "max_inputs"):
        if int(s[key]) < 1:
            raise ConfigError(f"serve.{key}", f"{s[key]} must be at least 1")
    if float(s.batch_wait_ms) < 0:
        raise ConfigError("serve.batch_wait_ms", f"{s.batch_wait_ms} must be >= 0")
    if float(s.shutdown_timeout_s) < 0:
        raise ConfigError("serve.shutdown_timeout_s", f"{s.shutdown_timeout_s} must be >= 0")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (IPv4 or IPv6 by the host's form); UsageError when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError("serve.host", f"{host!r} is not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = "is in use" if e.errno in (98, 48) else f"cannot be opened ({e.strerror})"
        raise UsageError(f"serve.port={port}: {host}:{port} {what}; choose another port with serve.port=...") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _api_key(cfg: DictConfig) -> str | None:
    key = cfg.serve.api_key if cfg.serve.api_key not in (None, "") else os.environ.get(API_KEY_ENV) or None
    return str(key) if key is not None else None


def load(cfg: DictConfig):
    """(model, tokenizer, task) of model.path, on the device and in the precision asked."""
    from bigml.commands.generate import _device
    from bigml.data.tokenizer import load_tokenizer
    from bigml.decode_speed import resolve_dtype
    from bigml.models.architectures import describe
    from bigml.models.loading import load_model, model_task, read_config

    path = str(cfg.model.path)
    config = read_config(path)
    task = model_task(config, path, str(cfg.get("task") or "auto"))
    if not task.endpoints:
        raise DataError(f"model.path={path}: bigml serve has no endpoint for a {task.name} model")
    tokenizer = load_tokenizer(path, key="model.path")
    device = _device(cfg)
    dtype = resolve_dtype(str(cfg.precision), device)
    model, task = load_model(path, task, config=config)
    if getattr(config, "quantization_config", None) is None:  # a torchao-quantized model keeps its own tensors
        model = model.to(device=device, dtype=dtype)
    log.info("loaded %s (%s, %s, %s)", path, describe(config), task.name, str(dtype).removeprefix("torch."))
    return model.eval(), tokenizer, task


def run(cfg: DictConfig) -> dict[str, Any]:
    _check(cfg)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"bigml serve needs {e.name}: pip install 'bigml[serve]' (fastapi, uvicorn)") from None
    s = cfg.serve
    sock = bind(str(s.host), int(s.port))
    try:
        model, tokenizer, task = load(cfg)
        from bigml.serving.app import ROUTES, ServeOptions, create_app
        from bigml.serving.model import ServedModel

        name = str(s.name) if s.name else Path(str(cfg.model.path)).expanduser().resolve().name
        if name == "model":  # a bigml run's model/ folder: the run's name says more
            name = Path(str(cfg.model.path)).expanduser().resolve().parent.name
        served = ServedModel(model, tokenizer, task, name, default_max_tokens=int(s.max_tokens), max_inputs=int(s.max_inputs))
        api_key = _api_key(cfg)
        app = create_app(served, ServeOptions(max_batch_size=int(s.max_batch_size), batch_wait_ms=float(s.batch_wait_ms),
                                              workers=int(s.workers), api_key=api_key))
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("bigml serve: %s (%s) on %s; endpoints: %s%s; batches of up to %d, %d worker(s)", name, task.name, url,
                 ", ".join(ROUTES[e] for e in served.endpoints), " (bearer token required)" if api_key else "",
                 int(s.max_batch_size), int(s.workers))
        if str(s.host) not in ("127.0.0.1", "localhost", "::1") and not api_key:
            log.warning("warning: serving on %s without an API key: anyone who reaches this port can use the model "
                        "(set serve.api_key or %s)", s.host, API_KEY_ENV)
        config = uvicorn.Config(app, log_config=None, access_log=bool(s.access_log), lifespan="on",
                                timeout_graceful_shutdown=float(s.shutdown_timeout_s) or None)
        server = _Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
    snapshot = app.state.metrics.snapshot(app.state.batcher)
    log.info("bigml serve: stopped (%s) after %d requests", server.stopped_by or "shutdown", snapshot["requests"]["total"])
    return {"requests": snapshot["requests"]["total"], "stopped_by": server.stopped_by}


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a signal that stopped it is not raised again afterwards:
        uvicorn re-raises SIGTERM after a graceful shutdown, which would end bigml with -15 instead
        of exit code 0 and skip its last log line."""

        stopped_by: str | None = None

        def handle_exit(self, sig, frame) -> None:
            self.stopped_by = signal.Signals(sig).name
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


def _Server(config):
    return _server_class()(config)
