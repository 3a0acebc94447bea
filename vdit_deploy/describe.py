"""`vdit info` on a diffusers model directory: what `vdit export` would take from it, read from its JSON
and the safetensors headers alone (no weights loaded: the same files the loader reads)."""
from __future__ import annotations

import json
from pathlib import Path

from vdit_deploy.errors import VditError
from vdit_deploy.sources import diffusers_contract
from vdit_deploy.weights import all_tensors, diffusers_weight_files


def describe_diffusers_dir(path) -> str:
    """What `vdit export` would take from a diffusers directory, read from its JSON and the safetensors
    headers (no weights loaded, the same files the loader reads): class, contract, parameters."""
    from vdit_deploy.files import read_json

    path = Path(path)
    config = read_json(path / "config.json", "model config", root=path)
    files, headers = diffusers_weight_files(path)
    tensors = all_tensors(headers)
    params = sum(t.numel for t in tensors.values())
    cls_name = f"diffusers:{config['_class_name']}"
    lines = [f"diffusers model  {path}  ({cls_name})"]
    try:
        c = diffusers_contract(path, config, cls_name, None, None, None, (), None, None)
        from vdit_deploy.sampling import describe_sampling

        lines += [f"contract    latent {list(c.latent)}, output {c.output}, cond {c.describe_cond()}",
                  f"schedule    {json.dumps(c.schedule.to_dict())}", describe_sampling(c)]
        if c.family:
            lines.append(f"family      {c.family['name']}: x_t (B, C, F, H, W), the model is fed {c.family['layout']}, "
                         f"args {json.dumps(c.family['args'])}")
    except VditError as e:
        known = family_lines(cls_name, config)
        if not known and cls_name == "diffusers:LatteTransformer3DModel":   # known: a broken config is an error
            raise
        lines.append(known or f"contract    (export needs options: {e})")
        lines.append(f"export      refused: {e}" if "family " in lines[-1] else "")
    shards = [f for f in files if f.name in headers]
    lines.append(f"weights     {len(shards)} safetensors file(s), {params:,} parameters "
                 f"({sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)")
    return "\n".join(line for line in lines if line)


def family_lines(cls_name: str, config: dict) -> str:
    """What a known family is (layout, latent, conditioning, objective) when its export is refused."""
    from vdit_deploy import families

    try:
        family = families.by_class(cls_name)
        if family is None:
            return ""
        latent, cond = family.latent(config), family.cond(config)
    except (VditError, KeyError, TypeError, ValueError):
        return ""
    row = family.row()
    return (f"family      {family.name}: {row['objective']}, x_t (B, C, F, H, W), the model is fed {row['layout']}, "
            f"batch {row['batch']}, default sampler {row['sampler']}\n"
            f"latent      {list(latent)}  cond {'; '.join(map(str, cond))}")
