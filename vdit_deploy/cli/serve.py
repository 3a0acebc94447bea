"""`vdit serve-export`: an NVIDIA Triton model repository from an export; `vdit serve`: a Triton server on it."""
from __future__ import annotations

from pathlib import Path

import click

from vdit_deploy.cli.app import main

PORT = click.IntRange(0, 65535)
SERVER_DIR = click.option("--dir", "server_dir", type=click.Path(path_type=Path), default=None, envvar="VDIT_TRITON_DIR",
                          help="The server's own directory (nvidia-pytriton + numpy 1, apart from this environment). "
                               "[default: $VDIT_TRITON_DIR, else ~/.cache/vdit-deploy/triton]")


# ---- serve-export (NVIDIA Triton model repository) ----------------------------------------------
@main.command("serve-export")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--triton", "triton_dir", required=True, type=click.Path(path_type=Path),
              help="Model repository to write (replaced atomically).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "python"]), default=None,
              help="The denoiser's Triton backend: onnxruntime, tensorrt (with --engine), or python (vdit's ONNX "
                   "Runtime in a Python model: what `vdit serve` runs). [default: tensorrt with --engine, else "
                   "onnxruntime]")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Serve this `vdit build` denoiser engine (.engine with its .json manifest) instead of the ONNX.")
@click.option("--precision", default="fp32", show_default=True, help="ONNX variant to serve (fp32, fp16, int8...).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1),
              help="Denoiser instances per GPU (per server for --backend python).")
@click.option("--sampler-instances", default=8, show_default=True, type=click.IntRange(1),
              help="Sampling loops that run at once: the denoiser calls the dynamic batcher can merge.")
def serve_export(export_dir, triton_dir, backend, engine, precision, instances, sampler_instances):
    """Write an NVIDIA Triton model repository: the denoiser with dynamic batching + the sampler loop."""
    from vdit_deploy.export.triton import write_triton_repo

    notes = write_triton_repo(export_dir, triton_dir, engine=engine, precision=precision, instances=instances,
                              sampler_instances=sampler_instances, backend=backend)
    click.echo(f"wrote Triton model repository {triton_dir}")
    for note in notes:
        click.echo(f"  {note}")
    if backend == "python":
        click.echo(f"  start it: vdit serve {triton_dir}")
    else:
        click.echo("  start it: see docs/serving.md (tritonserver --model-repository ...)")


# ---- serve (Triton Inference Server, the binary nvidia-pytriton ships) ---------------------------
@main.command("serve-setup")
@SERVER_DIR
def serve_setup(server_dir):
    """Install the tritonserver that `vdit serve` runs into a directory of its own: pip install --no-deps
    --target DIR nvidia-pytriton==0.7.0 'numpy<2' (about 230 MB; its Python backend needs numpy 1, this
    environment keeps its numpy). Does nothing when DIR is set up already."""
    from vdit_deploy.serve import setup

    setup(server_dir, echo=click.echo)


@main.command("serve")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 serves every interface (nothing beyond loopback otherwise).")
@click.option("--http-port", default=8000, show_default=True, type=PORT, help="0: a free port.")
@click.option("--grpc-port", default=8001, show_default=True, type=PORT, help="0: a free port.")
@click.option("--metrics-port", default=8002, show_default=True, type=PORT, help="0: a free port.")
@SERVER_DIR
def serve(repo, host, http_port, grpc_port, metrics_port, server_dir):
    """Run NVIDIA Triton Inference Server on a model repository from `vdit serve-export --backend python`
    (nvidia-pytriton's tritonserver, which `vdit serve-setup` installs); prints its addresses and stops
    cleanly on Ctrl-C or SIGTERM."""
    from vdit_deploy.serve import serve as run_server

    run_server(repo, host, (http_port, grpc_port, metrics_port), echo=click.echo, server=server_dir)
