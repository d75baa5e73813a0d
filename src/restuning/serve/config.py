"""`ServeConfig`: what `restuning serve` serves and how, from the command line or a YAML file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigBase, from_dict, option, read_yaml
from ..errors import ConfigError
from ..train.task_table import valid_task_name


@dataclass
class ServeConfig(ConfigBase):
    """What `restuning serve` serves and how (the flags of the command, or the keys of its `--config` YAML)."""

    runs: list[str] = option(default_factory=list, help="finished runs' folders, served as tasks named after their "
                             "folders; `name=folder` names one; empty: the finished runs `restuning demo` left in "
                             "runs/demo")
    host: str = option("127.0.0.1", help="the address the HTTP service listens on (localhost unless told otherwise)")
    port: int = option(8000, ge=0, help="the HTTP port")
    task_root: str | None = option(None, help="the folder under which `POST /v1/tasks` may add runs; null: the "
                                   "current folder")
    api_key: str | None = option(None, help="when set, every request but `/health` needs `Authorization: Bearer "
                                 "<key>` (or `X-API-Key: <key>`)")
    max_batch_size: int = option(64, ge=1, help="inputs per backbone forward at most; requests are batched up to it")
    max_wait_ms: float = option(10.0, ge=0, help="how long a batch waits for more requests before the backbone runs")
    max_inputs: int = option(64, ge=1, help="inputs per request at most (larger requests get 413); at most "
                             "`max_batch_size`")
    max_text_chars: int = option(10_000, ge=1, help="characters per text at most (413 beyond)")
    max_image_pixels: int = option(4096 * 4096, ge=1, help="pixels per image at most (413 beyond), checked before "
                                   "the image is decoded")
    max_body_bytes: int = option(16 * 2**20, ge=1, help="bytes per request body at most (413 beyond)")
    replicas: int = option(1, ge=1, help="copies of each backbone deployment, scheduled by Ray (on several machines "
                           "with a Ray cluster)")
    replica_cpus: float = option(0.0, ge=0, help="CPUs Ray reserves for each backbone replica: 0 on one machine, 1 "
                                 "or more on a cluster so that Ray spreads the replicas over its nodes")
    torch_threads: int | None = option(None, ge=1, help="threads each backbone replica's torch runs on; null: the "
                                       "machine's cores shared among its replicas (`replica_cpus` of them on a "
                                       "cluster). Ray would otherwise give each replica one thread")
    address: str | None = option(None, help="a running Ray cluster to join (`auto`, or `ray://host:10001`); null: "
                                 "a local Ray instance")
    share_forward: bool = option(True, help="one backbone forward for all bypass tasks of a batch; false runs one "
                                 "per task (the baseline of benchmarks/serve.py)")
    verbose: bool = option(False, help="Ray's and Serve's own logs on the console")

    def validate(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key: an empty key would let every request in; give a key or leave it unset")
        if self.max_inputs > self.max_batch_size:
            raise ConfigError(f"max_inputs ({self.max_inputs}) must not exceed max_batch_size "
                              f"({self.max_batch_size}): a request is answered within one batch")
        names = [self._named(entry)[0] for entry in self.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"runs: task names {duplicates} given twice; name them with name=folder")

    def named_runs(self) -> dict[str, Path]:
        """`{task name: run folder}`: a folder's name, or the name before '=' in `name=folder`."""
        return dict(self._named(entry) for entry in self.runs)

    @staticmethod
    def _named(entry: str) -> tuple[str, Path]:
        name, sep, folder = entry.partition("=")
        if not sep:
            folder, name = entry, Path(entry).resolve().name
        if not valid_task_name(name):
            raise ConfigError(f"runs: task name {name!r} (of {entry!r}): expected a name without '.' or '/'; "
                              "name it with name=folder")
        return name, Path(folder)

    def threads(self) -> int:
        """The torch threads of one backbone replica."""
        if self.torch_threads is not None:
            return self.torch_threads
        if self.replica_cpus > 0:
            return max(1, int(self.replica_cpus))
        return max(1, (os.cpu_count() or 1) // self.replicas)

    @property
    def root(self) -> Path:
        return Path(self.task_root or ".").resolve()


def load_serve_config(path: str | Path | None, overrides: dict | None = None) -> ServeConfig:
    """A `ServeConfig` from a YAML file (or defaults when `path` is None), with `key=value` overrides."""
    data = read_yaml(path, overrides) if path is not None else dict(overrides or {})
    return from_dict(ServeConfig, data, where=str(path or "serve"))
