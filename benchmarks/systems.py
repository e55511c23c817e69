"""The systems compared in the core section, each with a durable save and a ready-to-train restore.

Every ``save`` returns once the checkpoint is durable (files fsynced); every ``restore``
returns once the values are in the live model and optimizer objects (not a lazy mmap).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks.common import fsync_path


class System:
    name = ""
    label = ""
    #: how this system stores/reads, for the Markdown notes
    notes = ""

    def save(self, objs: Mapping[str, Any], path: str) -> None:
        raise NotImplementedError

    def restore(self, objs: Mapping[str, Any], path: str) -> None:
        raise NotImplementedError


class Ckpt(System):
    name = "ckpt"
    label = "ckpt"
    notes = "ckpt.save to a fresh local directory store (fsync on), ckpt.restore into the objects"

    def save(self, objs: Mapping[str, Any], path: str) -> None:
        import ckpt

        ckpt.save(path, dict(objs), step=1)

    def restore(self, objs: Mapping[str, Any], path: str) -> None:
        import ckpt

        ckpt.restore(path, dict(objs))


class TorchSave(System):
    name = "torch.save"
    label = "torch.save / torch.load"
    notes = "torch.save of the state dicts + flush + fsync (file and directory); torch.load(weights_only=True) + load_state_dict"

    def save(self, objs: Mapping[str, Any], path: str) -> None:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "state.pt")
        with open(file, "wb") as f:
            torch.save({k: o.state_dict() for k, o in objs.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(path)

    def restore(self, objs: Mapping[str, Any], path: str) -> None:
        sd = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        for k, o in objs.items():
            o.load_state_dict(sd[k])


def _dcp_state(objs: Mapping[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model = objs["model"]
    opt = objs.get("optim")
    if opt is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _dcp_apply(objs: Mapping[str, Any], sd: Mapping[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    model = objs["model"]
    opt = objs.get("optim")
    if opt is None:
        set_model_state_dict(model, sd["model"])
    else:
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class DCP(System):
    name = "dcp"
    label = "torch.distributed.checkpoint"
    notes = (
        "dcp.save with FileSystemWriter (its defaults: sync_files=True, one thread) of get_state_dict(); "
        "dcp.load in place into get_state_dict() of the objects + set_state_dict"
    )

    def __init__(self, zstd: bool = False) -> None:
        self.zstd = zstd
        if zstd:
            self.name = "dcp+zstd"
            self.label = "torch.distributed.checkpoint + ZStandard"
            self.notes = "as DCP, FileSystemWriter(_extensions=[ZStandard()]) (experimental stream extension)"

    def save(self, objs: Mapping[str, Any], path: str) -> None:
        import torch.distributed.checkpoint as dcp

        ext = None
        if self.zstd:
            from torch.distributed.checkpoint._extension import ZStandard

            ext = [ZStandard()]
        dcp.save(_dcp_state(objs), storage_writer=dcp.FileSystemWriter(path, _extensions=ext))

    def restore(self, objs: Mapping[str, Any], path: str) -> None:
        import torch.distributed.checkpoint as dcp

        sd = _dcp_state(objs)
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
        _dcp_apply(objs, sd)


class Safetensors(System):
    name = "safetensors"
    label = "safetensors"
    notes = (
        "save_file of the flattened state (optimizer state as 'optim/<param>/<name>', param_groups as JSON "
        "metadata) + fsync; load_file + load_state_dict, optimizer tensors copied into the optimizer's state "
        "(load_file maps the file; keeping those tensors would be a lazy mmap, not a restore)"
    )

    def save(self, objs: Mapping[str, Any], path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        flat: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        for key, obj in objs.items():
            sd = obj.state_dict()
            if isinstance(obj, torch.optim.Optimizer):
                for pid, st in sd["state"].items():
                    for name, v in st.items():
                        if isinstance(v, torch.Tensor):
                            flat[f"{key}/{pid}/{name}"] = v.contiguous()
                        else:
                            meta[f"{key}/{pid}/{name}"] = json.dumps(v)
                meta[f"{key}.param_groups"] = json.dumps(sd["param_groups"])
            else:
                for name, v in sd.items():
                    flat[f"{key}/{name}"] = v.contiguous()
        file = os.path.join(path, "state.safetensors")
        save_file(flat, file, metadata=meta)
        fsync_path(file)
        fsync_path(path)

    def restore(self, objs: Mapping[str, Any], path: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        file = os.path.join(path, "state.safetensors")
        flat = load_file(file)
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
        for key, obj in objs.items():
            prefix = key + "/"
            if isinstance(obj, torch.optim.Optimizer):
                sd = obj.state_dict()  # references the optimizer's own (pre-built) state tensors
                state: dict[int, dict[str, Any]] = {}
                for name, v in flat.items():
                    if not name.startswith(prefix):
                        continue
                    pid_s, field = name[len(prefix) :].split("/", 1)
                    pid = int(pid_s)
                    cur = sd["state"].get(pid, {}).get(field)
                    if isinstance(cur, torch.Tensor) and cur.shape == v.shape and cur.dtype == v.dtype:
                        cur.copy_(v)
                        v = cur
                    else:
                        v = v.clone()
                    state.setdefault(pid, {})[field] = v
                for name, raw in meta.items():
                    if name.startswith(prefix):
                        pid_s, field = name[len(prefix) :].split("/", 1)
                        state.setdefault(int(pid_s), {})[field] = json.loads(raw)
                obj.load_state_dict({"state": state, "param_groups": json.loads(meta[f"{key}.param_groups"])})
            else:
                obj.load_state_dict({name[len(prefix) :]: v for name, v in flat.items() if name.startswith(prefix)})


def all_systems() -> list[System]:
    return [Ckpt(), TorchSave(), DCP(), DCP(zstd=True), Safetensors()]
