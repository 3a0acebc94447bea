"""CI guard on quality (issue 25): the shipped checkpoint, quantized with the default options on the CPU
the suite runs on, sampled with the default sampler (UniPC, 15 steps, guidance 2, every class): each
precision's final videos against fp32's. INT8 (dynamic and Q/DQ) >= 30 dB, fp16 >= 40 dB
(calibration/report.PSNR_TARGETS). On a CPU without VNNI the old full-range s8 weights give 16-19 dB
and this fails; benchmarks/int8_haswell.sh shows it under qemu's Haswell (docs/calibration.md)."""
import pytest

from vdit_deploy.calibration.report import PSNR_TARGETS, video_psnr
from vdit_deploy.export.variants import FP16, INT8, INT8_DYNAMIC, INT8_QDQ
from vdit_deploy.runtimes.cpu_isa import host_isa

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped checkpoint exported, with its fp16 and default INT8 graphs (dynamic; Q/DQ, denoiser
    and step graph together as `vdit calibrate int8 --mode qdq` makes them, calibrated on one seed's
    default-sampler trajectory, its first 2 steps in float: 13 of 15 steps still run the INT8 kernels)."""
    from vdit_deploy.calibration.collect import collect
    from vdit_deploy.calibration.fp16 import convert_fp16
    from vdit_deploy.calibration.int8 import quantize_int8
    from vdit_deploy.checkpoint import SHIPPED
    from vdit_deploy.export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("guard")
    export = export_checkpoint(SHIPPED, root / "export")
    calib = collect(export, root / "calib", seeds=range(1))
    convert_fp16(export)
    quantize_int8(export)
    quantize_int8(export, calib, mode="qdq")
    return export


def test_default_precisions_keep_their_psnr_on_this_cpu(shipped):
    """The median over seeds 0-2 of each seed's worst video: one video of a static INT8 graph swings by
    several dB with small changes (onnxruntime 1.27 against 1.32: seed 0's Q/DQ video 29.6 against 32.2 dB,
    seeds 1-2 33-36 on both; docs/calibration.md), while the saturation this guards against is low on
    every seed (the full-range dynamic graph on the AVX2 EPYC: 21.5 / 23.4 / 25.6 dB)."""
    import numpy as np

    precisions = [FP16, INT8, INT8_QDQ]
    per_seed = [video_psnr(shipped, precisions, seeds=(seed,)) for seed in range(3)]
    got = {p: float(np.median([s[p] for s in per_seed])) for p in precisions}
    want = {FP16: PSNR_TARGETS[FP16], INT8: PSNR_TARGETS[INT8_DYNAMIC], INT8_QDQ: PSNR_TARGETS[INT8_QDQ]}
    missed = {p: round(db, 2) for p, db in got.items() if not db >= want[p]}
    assert not missed, f"on {host_isa()}: {missed} dB below {want} (per seed: {per_seed})"
