"""`restuning serve`: finished runs as an HTTP service on Ray Serve, one frozen backbone per deployment and
its tasks batched into shared forwards. Ray is imported only when the service starts."""

from .config import ServeConfig, load_serve_config
from .requests import RequestError, parse_predict

__all__ = ["ServeConfig", "load_serve_config", "RequestError", "parse_predict", "start", "stop"]


def start(*args, **kwargs):
    from .service import start as _start

    return _start(*args, **kwargs)


def stop() -> None:
    from .service import stop as _stop

    _stop()
