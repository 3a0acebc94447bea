"""Every scheduler class in diffusers' schedulers/ folder, as its save_pretrained config would hold it
(its __init__ defaults): read exactly, or refused in one line naming the class and the file."""
import inspect

import numpy as np
import pytest

from vdit_deploy.errors import VditError
from vdit_deploy.scheduler_config import CLASSES, REFUSED, read_scheduler_config

diffusers = pytest.importorskip("diffusers", reason="pip install 'vdit-deploy[dev]' for the diffusers comparisons")
import diffusers.schedulers as all_schedulers  # noqa: E402

FILE = "model/scheduler/scheduler_config.json"


def scheduler_classes():
    out = []
    for name in sorted(dir(all_schedulers)):
        if not name.endswith("Scheduler"):
            continue
        try:
            cls = getattr(all_schedulers, name)
        except (AttributeError, ImportError, RuntimeError):    # deprecated or missing optional dependency
            continue
        if inspect.isclass(cls):
            out.append(name)
    return out


def default_config(name):
    """The config save_pretrained writes for the class at its defaults (keys from __init__)."""
    cls = getattr(all_schedulers, name)
    params = inspect.signature(cls.__init__).parameters
    config = {k: p.default for k, p in params.items()
              if k != "self" and p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty}
    return {"_class_name": name, "_diffusers_version": diffusers.__version__,
            **{k: (list(x) if isinstance(x, tuple) else x) for k, x in config.items()}}


SEQ = 1024     # the token count a dynamic shift would use


@pytest.mark.parametrize("name", scheduler_classes())
def test_every_diffusers_scheduler_is_read_exactly_or_refused_in_one_line(name):
    config = default_config(name)
    if name not in CLASSES:
        with pytest.raises(VditError) as e:
            read_scheduler_config(config, FILE, SEQ)
        message = str(e.value)
        assert "\n" not in message and message.startswith(FILE) and name in message
        assert ("is not supported" in message) == (name in REFUSED)
        return
    schedule, prediction, variance = read_scheduler_config(config, FILE, SEQ)
    if schedule.kind == "flow":        # its sigmas and steps: tests/test_flow.py's trajectories
        assert prediction == "flow" and schedule.shift == config.get("shift", 1.0)
        return
    assert prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[config["prediction_type"]]
    assert schedule.num_timesteps == config["num_train_timesteps"]
    try:
        theirs = getattr(all_schedulers, name)()
    except ImportError as e:             # an optional dependency of that class (its schedule is still read)
        pytest.skip(f"{name} needs {e}")
    np.testing.assert_allclose(schedule.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=2e-5)
    # the x0 clipping is that class's step's (CogVideoX's never clips; the solvers and Euler have none)
    clips = config.get("clip_sample") and not name.startswith("CogVideoX")
    assert schedule.clip == (config["clip_sample_range"] if clips else None)
    assert schedule.sampler == CLASSES[name][1]


@pytest.mark.parametrize("name,keys,message", [
    ("DDIMScheduler", {"thresholding": True}, "thresholding True: dynamic thresholding is not reproduced"),
    ("DDPMScheduler", {"trained_betas": [0.1, 0.2]}, "trained_betas are not supported"),
    ("DDIMScheduler", {"timestep_spacing": "linspace"}, "linspace DDIM steps to t - T // steps"),
    ("DDIMScheduler", {"set_alpha_to_one": False}, "set_alpha_to_one False"),
    ("DDIMScheduler", {"steps_offset": 1}, "steps_offset 1: leading timesteps offset"),
    ("UniPCMultistepScheduler", {"solver_order": 3}, "solver_order 3: orders 1 and 2 are run"),
    ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "solver_type 'bh1'"),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas True"),
    ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type 'sigma_min'"),
    ("UniPCMultistepScheduler", {"disable_corrector": [0]}, "disable_corrector"),
    ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction"}, "flow_prediction needs use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type 'sde-dpmsolver\\+\\+'"),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "solver_type 'heun'"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "flow sigmas are read with flow_prediction"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "continuous timesteps"),
    ("DEISMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas True: flow sigmas are read for UniPC"),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, "the shift comes from the denoiser's token"),
    ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "only one of"),
    ("FlowMatchEulerDiscreteScheduler", {"time_shift_type": "cubic"}, "time_shift_type must be one of"),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 0}, "shift must be > 0"),
    ("CogVideoXDDIMScheduler", {"snr_shift_scale": -1.0}, "snr_shift_scale must be > 0"),
    ("EDMEulerScheduler", {}, "EDMEulerScheduler is not supported: EDM preconditioning"),
    ("NoSuchScheduler", {}, "unknown scheduler class 'NoSuchScheduler'"),
])
def test_keys_that_cannot_be_reproduced_are_refused_naming_key_and_file(name, keys, message):
    config = {**(default_config(name) if hasattr(all_schedulers, name) else {"_class_name": name}), **keys}
    with pytest.raises(VditError, match=message) as e:
        read_scheduler_config(config, FILE)
    assert "\n" not in str(e.value) and str(e.value).startswith(FILE)


def test_reproduced_keys_change_the_schedule():
    """clip_sample_range is applied as given; zero terminal SNR ends alpha_bar at 0; unknown keys (not
    in the class's __init__) are ignored, as diffusers' from_config ignores them."""
    base = default_config("DDIMScheduler") | {"timestep_spacing": "trailing"}
    schedule, *_ = read_scheduler_config(base | {"clip_sample_range": 2.5, "not_a_key": 1}, FILE)
    assert schedule.clip == 2.5 and schedule.spacing == "trailing"
    zero, *_ = read_scheduler_config(base | {"rescale_betas_zero_snr": True}, FILE)
    assert zero.alphas_cumprod[-1] == 0 and zero.alphas_cumprod[0] == pytest.approx(schedule.alphas_cumprod[0])
    theirs = diffusers.DDIMScheduler(rescale_betas_zero_snr=True)
    np.testing.assert_allclose(zero.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-9)
    dpm, *_ = read_scheduler_config(default_config("DPMSolverMultistepScheduler") | {"lambda_min_clipped": -5.1}, FILE)
    assert dpm.lambda_min == -5.1 and read_scheduler_config(default_config("UniPCMultistepScheduler"))[0].lambda_min is None


def test_wan_config_reads_as_unipc_flow_with_its_shift():
    wan = {"_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
           "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
           "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
           "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
           "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
           "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
           "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}
    schedule, prediction, _ = read_scheduler_config(wan, FILE)
    assert (prediction, schedule.sampler, schedule.steps, schedule.shift, schedule.order) == ("flow", "unipc", 50, 3.0, 2)
