"""diffusers' scheduler_config.json read by its `_class_name`: each class's keys with diffusers' defaults
for absent ones (keys outside the class's signature are ignored, as diffusers' from_config does), into a
Schedule (a DDPM-family beta schedule) or a FlowSchedule (flow matching), the prediction type and the
variance. A class, or a key's value, that the project cannot reproduce is refused in one line naming the
key and the file, never approximated.

A config says two things: how the model was trained (the betas or the flow path, what it predicts) and
the sampler its pipeline runs. The first is always read exactly. For the classes whose sampler the
project runs (DDIM, DPM-Solver++, UniPC, CogVideoX's DDIM and DPM, FlowMatchEuler) the second becomes
the schedule's default sampler, and the keys that would change that sampler's math beyond what the plan
reproduces are refused. The other beta-schedule classes (Euler, PNDM, LMS, Heun, ...) give the
training schedule only; their own sampler is not run (the project's is), which `vdit info` says.
"""
from __future__ import annotations

import math

from vdit_deploy import validate as v
from vdit_deploy.errors import VditError
from vdit_deploy.flow import FlowSchedule
from vdit_deploy.schedules import Schedule

DIFFUSERS_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_VARIANCES = {None: "fixed", "fixed_small": "fixed", "fixed_small_log": "fixed",
                       "learned_range": "learned_range"}

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None, "prediction_type": "epsilon"}
_LDM = {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012}
_THRESH = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_FLOW_SIGMAS = {"use_flow_sigmas": False, "flow_shift": 1.0}
_DDIM = {**_BETAS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0, **_THRESH,
         "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}
_COGVIDEOX = {**_LDM, "beta_schedule": "scaled_linear", "clip_sample": True, "set_alpha_to_one": True,
              "steps_offset": 0, "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
              "rescale_betas_zero_snr": False, "snr_shift_scale": 3.0}
_DDPM = {**_BETAS, "variance_type": "fixed_small", "clip_sample": True, **_THRESH, "clip_sample_range": 1.0,
         "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
_FLOW_MATCH = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
               "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
               "shift_terminal": None, **_SIGMAS, "time_shift_type": "exponential", "stochastic_sampling": False}

# class -> (its __init__ keys with diffusers 0.42's defaults, the sampler of ours that is that class's)
CLASSES = {
    "DDPMScheduler": (_DDPM, None),          # its pipelines' 1000 ancestral steps: the project's default instead
    "DDPMParallelScheduler": (_DDPM, None),
    "DDIMScheduler": (_DDIM, "ddim"),
    "DDIMParallelScheduler": (_DDIM, "ddim"),
    "CogVideoXDDIMScheduler": (_COGVIDEOX, "ddim"),
    "CogVideoXDPMScheduler": (_COGVIDEOX, "cogvideox-dpm"),
    "DPMSolverMultistepScheduler": ({**_BETAS, "solver_order": 2, **_THRESH, "algorithm_type": "dpmsolver++",
                                     "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                                     **_SIGMAS, "use_lu_lambdas": False, **_FLOW_SIGMAS, "final_sigmas_type": "zero",
                                     "lambda_min_clipped": -math.inf, "variance_type": None, **_SPACING,
                                     "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
                                     "time_shift_type": "exponential"}, "dpm++"),
    "UniPCMultistepScheduler": ({**_BETAS, "solver_order": 2, **_THRESH, "predict_x0": True, "solver_type": "bh2",
                                 "lower_order_final": True, "disable_corrector": [], "solver_p": None, **_SIGMAS,
                                 **_FLOW_SIGMAS, **_SPACING, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
                                 "use_dynamic_shifting": False, "time_shift_type": "exponential", "sigma_min": None,
                                 "sigma_max": None, "shift_terminal": None}, "unipc"),
    "FlowMatchEulerDiscreteScheduler": (_FLOW_MATCH, "euler"),
    # beta-schedule classes whose own sampler is not run here: their training schedule is read
    "EulerDiscreteScheduler": ({**_BETAS, "interpolation_type": "linear", **_SIGMAS, "sigma_min": None,
                                "sigma_max": None, **_SPACING, "timestep_type": "discrete",
                                "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}, None),
    "EulerAncestralDiscreteScheduler": ({**_BETAS, **_SPACING, "rescale_betas_zero_snr": False}, None),
    "PNDMScheduler": ({**_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
                       "steps_offset": 0}, None),
    "LMSDiscreteScheduler": ({**_BETAS, **_SIGMAS, **_SPACING}, None),
    "HeunDiscreteScheduler": ({**_LDM, **_SIGMAS, "clip_sample": False, "clip_sample_range": 1.0, **_SPACING}, None),
    "KDPM2DiscreteScheduler": ({**_LDM, **_SIGMAS, **_SPACING}, None),
    "KDPM2AncestralDiscreteScheduler": ({**_LDM, **_SIGMAS, **_SPACING}, None),
    "DEISMultistepScheduler": ({**_BETAS, "solver_order": 2, **_THRESH, "algorithm_type": "deis", "solver_type": "logrho",
                                "lower_order_final": True, **_SIGMAS, **_FLOW_SIGMAS, **_SPACING,
                                "use_dynamic_shifting": False, "time_shift_type": "exponential"}, None),
    "DPMSolverSinglestepScheduler": ({**_BETAS, "solver_order": 2, **_THRESH, "algorithm_type": "dpmsolver++",
                                      "solver_type": "midpoint", "lower_order_final": False, **_SIGMAS, **_FLOW_SIGMAS,
                                      "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf,
                                      "variance_type": None, "use_dynamic_shifting": False,
                                      "time_shift_type": "exponential"}, None),
    "SASolverScheduler": ({**_BETAS, "predictor_order": 2, "corrector_order": 2, "tau_func": None, **_THRESH,
                           "algorithm_type": "data_prediction", "lower_order_final": True, **_SIGMAS, **_FLOW_SIGMAS,
                           "lambda_min_clipped": -math.inf, "variance_type": None, **_SPACING}, None),
}

_EDM = "EDM preconditioning (Cosmos-Predict1's sigma-space denoiser: c_skip, c_out, c_in, c_noise) is not supported"
_DISTILLED = "a distilled or few-step sampler of its own, whose model the project's samplers do not reproduce"
REFUSED = {
    "EDMEulerScheduler": _EDM, "EDMDPMSolverMultistepScheduler": _EDM, "CosineDPMSolverMultistepScheduler": _EDM,
    "DPMSolverSDEScheduler": "a k-diffusion SDE sampler (torchsde's Brownian tree noise) the project does not reproduce",
    "LCMScheduler": _DISTILLED, "TCDScheduler": _DISTILLED, "FlowMatchLCMScheduler": _DISTILLED,
    "FlowMapEulerDiscreteScheduler": _DISTILLED, "HeliosScheduler": _DISTILLED, "HeliosDMDScheduler": _DISTILLED,
    "PiflowScheduler": _DISTILLED, "SCMScheduler": _DISTILLED, "CMStochasticIterativeScheduler": _DISTILLED,
    "MiniMaxH3Scheduler": _DISTILLED, "DiscreteDDIMScheduler": _DISTILLED, "EntropyBoundScheduler": _DISTILLED,
    "FlowMatchHeunDiscreteScheduler": "Heun's second model call per step is not a fused step; use a "
                                      "FlowMatchEulerDiscreteScheduler config (same training objective)",
    "LTXEulerAncestralRFScheduler": "its ancestral re-noising between sigmas is not reproduced; use a "
                                    "FlowMatchEulerDiscreteScheduler config (same training objective)",
    "DDIMInverseScheduler": "an inversion scheduler (data to noise), not a sampler",
    "DPMSolverMultistepInverseScheduler": "an inversion scheduler (data to noise), not a sampler",
    "IPNDMScheduler": "its trained_betas-only schedule is not supported",
    "RePaintScheduler": "inpainting's resampling jumps are not a sampler the project runs",
    "UnCLIPScheduler": "unCLIP's prior/decoder schedule is not a video DiT's",
    "ScoreSdeVeScheduler": "a variance-exploding SDE (score model), not a DDPM or flow schedule",
    "KarrasVeScheduler": "a variance-exploding schedule, not a DDPM or flow schedule",
    "VQDiffusionScheduler": "discrete (token) diffusion", "AmusedScheduler": "masked token generation",
    "BlockRefinementScheduler": "masked token generation", "DDPMWuerstchenScheduler": "Wuerstchen's own schedule",
    "ConsistencyDecoderScheduler": "a VAE decoder's consistency schedule", "RFD4ProteinaScheduler": "a protein model's",
}
DEFAULT_CLASS = "DDPMScheduler"     # a config without _class_name: DDPM's keys (the oldest format)


def read_scheduler_config(config, where: str = "scheduler config", seq_len: int | None = None) -> tuple:
    """(Schedule or FlowSchedule, prediction, variance) from a scheduler_config.json dict. seq_len: the
    denoiser's token count, which a dynamic shift (use_dynamic_shifting) is computed from."""
    v.obj(config, where, where="", extra_ok=True)
    cls = config.get("_class_name", DEFAULT_CLASS)
    if cls in REFUSED:
        v.fail(where, f"{cls} is not supported: {REFUSED[cls]}")
    if cls not in CLASSES:
        v.fail(where, f"unknown scheduler class {v.show(cls)}: the supported ones are {', '.join(CLASSES)}")
    defaults, sampler = CLASSES[cls]
    c = {**defaults, **{k: config[k] for k in config if k in defaults}}
    r = _Reader(c, f"{where} ({cls})")
    if cls == "FlowMatchEulerDiscreteScheduler":
        return _flow_match(r, seq_len), "flow", "fixed"
    if c.get("use_flow_sigmas"):
        if sampler not in ("unipc", "dpm++"):
            r.fail("use_flow_sigmas", "flow sigmas are read for UniPC and DPM-Solver++ only (this class's sampler "
                                      "is not run here); use one of those or FlowMatchEulerDiscreteScheduler")
        return _flow_solver(r, sampler, seq_len), "flow", "fixed"
    return _beta(r, cls, sampler), *_prediction(r)


class _Reader:
    """Checked access to one config's keys; refusals name the key and the file."""

    def __init__(self, c: dict, where: str):
        self.c, self.where = c, where

    def fail(self, key: str, why: str):
        v.fail(self.where, f"{key} {v.show(self.c.get(key))}: {why}")

    def get(self, key, check=None, *args):
        value = self.c[key]
        try:
            return value if check is None else check(value, key, *args, where="")
        except VditError as e:
            v.fail(self.where, str(e))

    def require(self, key: str, allowed, why: str):
        """The key must keep one of the values the plan reproduces."""
        if key in self.c and self.c[key] not in allowed:
            self.fail(key, why)


def _beta(r: _Reader, cls: str, sampler: str | None) -> Schedule:
    c = r.c
    if c.get("trained_betas") is not None:
        r.fail("trained_betas", "trained_betas are not supported (name a beta_schedule)")
    r.require("thresholding", (False,), "dynamic thresholding is not reproduced (the step graph clips at a fixed "
                                        "range)")
    r.require("timestep_type", ("discrete",), "continuous timesteps feed the model 0.25 log(sigma), not t")
    r.require("use_flow_sigmas", (False,), "flow sigmas are read for UniPC and DPM-Solver++ only")
    if c["prediction_type"] == "flow_prediction":
        r.fail("prediction_type", "flow_prediction needs use_flow_sigmas (flow matching)")
    T = r.get("num_train_timesteps", v.integer, 2, 100_000)
    kind = DIFFUSERS_SCHEDULES[r.get("beta_schedule", v.string, DIFFUSERS_SCHEDULES)]
    ends = {}
    if kind != "cosine":    # diffusers ignores them for squaredcos_cap_v2
        ends = {k: r.get(k, v.number) for k in ("beta_start", "beta_end")}
    clip = None      # only DDPM/DDIM-style steps clip x0 (CogVideoX's never do)
    if "clip_sample" in c and not cls.startswith("CogVideoX") and r.get("clip_sample", v.boolean):
        clip = r.get("clip_sample_range", v.number, 0, None, True)
    pipeline = {}
    if sampler is not None:
        pipeline = _pipeline_sampler(r, cls, sampler)
    try:
        return Schedule(kind, T, **ends, zero_snr=bool(r.get("rescale_betas_zero_snr", v.boolean))
                        if "rescale_betas_zero_snr" in c else False,
                        snr_shift=float(r.get("snr_shift_scale", v.number, 0, None, True)) if "snr_shift_scale" in c else 1.0,
                        clip=None if clip is None else float(clip), **pipeline)
    except VditError as e:
        v.fail(r.where, str(e))


def _pipeline_sampler(r: _Reader, cls: str, sampler: str, flow: bool = False) -> dict:
    """The sampler defaults of a class the project runs, refusing its keys the plans do not reproduce."""
    c = r.c
    out = {"sampler": sampler}
    if sampler in ("ddim", "cogvideox-dpm", "dpm++", "unipc"):
        spacing = r.get("timestep_spacing", v.string, ("linspace", "leading", "trailing"))
        if spacing == "leading" and c.get("steps_offset", 0) != 0:
            r.fail("steps_offset", "leading timesteps offset by steps_offset are not reproduced (use 0)")
        if spacing == "linspace" and sampler in ("ddim", "cogvideox-dpm"):
            r.fail("timestep_spacing", "diffusers' linspace DDIM steps to t - T // steps, past the next timestep; "
                                       "not reproduced (leading and trailing are)")
        out["spacing"] = spacing
    r.require("set_alpha_to_one", (True,), "the last step goes to alpha_bar 1 (the clean video) in every plan")
    if cls.startswith("CogVideoX"):
        out["steps"] = 50       # CogVideoX's pipelines
    if sampler in ("dpm++", "unipc"):
        order = r.get("solver_order", v.integer, 1, None)
        if order not in (1, 2):
            r.fail("solver_order", "orders 1 and 2 are run (order 3 needs a second stored x0 in the fused step "
                                   "graph's state)")
        out["order"] = order
        r.require("final_sigmas_type", ("zero",), "every plan ends at sigma 0 (the clean video)")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            r.require(key, (False,), "re-spaced sigmas are read for flow schedules only")
        if not flow:
            r.require("use_dynamic_shifting", (False,), "dynamic shifting is for flow sigmas")
        if c.get("variance_type") == "learned":
            r.fail("variance_type", "learned (log variance) is not read; learned_range is")
    if sampler == "dpm++":
        r.require("algorithm_type", ("dpmsolver++",), "DPM-Solver++ (data prediction, ODE) is the plan run")
        r.require("solver_type", ("midpoint",), "the 2M midpoint update is the plan run")
        lam = c["lambda_min_clipped"]
        if lam is not None and not (isinstance(lam, (int, float)) and not isinstance(lam, bool)):
            r.fail("lambda_min_clipped", "must be a number")
        out["lambda_min"] = None if lam is None or lam == -math.inf else float(lam)
    if sampler == "unipc":
        r.require("predict_x0", (True,), "UniPC in data prediction (predict_x0) is the plan run")
        r.require("solver_type", ("bh2", "midpoint", "heun", "logrho"), "bh2 is the plan run (diffusers maps "
                                                                         "midpoint/heun/logrho to bh2)")
        r.require("lower_order_final", (True,), "the plan lowers the order at the last steps as diffusers' default")
        r.require("disable_corrector", ([],), "the corrector runs at every step")
        r.require("solver_p", (None,), "a separate predictor scheduler is not reproduced")
        out["lambda_min"] = None     # diffusers' UniPC has no clipping of lambda
    return out


def _prediction(r: _Reader) -> tuple[str, str]:
    prediction = DIFFUSERS_PREDICTIONS[r.get("prediction_type", v.string, DIFFUSERS_PREDICTIONS)]
    variance = r.c.get("variance_type")
    if variance == "learned" and "solver_order" in r.c:
        variance = "learned_range"      # a solver discards the variance channels either way
    if not (variance is None or isinstance(variance, str)) or variance not in DIFFUSERS_VARIANCES:
        v.fail(r.where, f"variance_type must be one of {', '.join(k for k in DIFFUSERS_VARIANCES if k)} "
                        f"(or absent), got {v.show(variance)}")
    return prediction, DIFFUSERS_VARIANCES[variance]


def _shift_fields(r: _Reader, seq_len) -> dict:
    c = r.c
    out = {"num_timesteps": r.get("num_train_timesteps", v.integer, 2, 100_000)}
    if c.get("use_dynamic_shifting"):
        if seq_len is None:
            r.fail("use_dynamic_shifting", "the shift comes from the denoiser's token count, which is not known here")
        out.update(dynamic_shift=True, seq_len=int(seq_len))
        for key, name in (("base_shift", "base_shift"), ("max_shift", "max_shift"),
                          ("base_image_seq_len", "base_seq_len"), ("max_image_seq_len", "max_seq_len")):
            if key in c:
                out[name] = r.get(key, v.number if "shift" in key else v.integer)
    out["time_shift"] = r.get("time_shift_type", v.string, ("exponential", "linear"))
    if c.get("shift_terminal") is not None:
        out["shift_terminal"] = float(r.get("shift_terminal", v.number, 0, 1, True))
    return out


def _flow_schedule(r: _Reader, **fields) -> FlowSchedule:
    try:
        return FlowSchedule(**fields)
    except VditError as e:
        v.fail(r.where, str(e).removeprefix("flow schedule: "))


def _flow_match(r: _Reader, seq_len) -> FlowSchedule:
    c = r.c
    fields = _shift_fields(r, seq_len)
    fields["shift"] = float(r.get("shift", v.number, 0, None, True))
    on = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if r.get(k, v.boolean)]
    if len(on) > 1:
        r.fail(on[1], f"only one of the re-spaced sigmas at a time (diffusers refuses {' and '.join(on)} too)")
    fields["sigmas"] = on[0].split("_")[1] if on else ""
    fields["invert"] = r.get("invert_sigmas", v.boolean)
    fields["stochastic"] = r.get("stochastic_sampling", v.boolean)
    if fields["invert"]:     # Mochi, the one model trained inverted: its pipeline's sigmas and 64 steps
        fields.update(base_sigmas="linear_quadratic", steps=64)
    return _flow_schedule(r, **fields, sampler="euler")


def _flow_solver(r: _Reader, sampler: str, seq_len) -> FlowSchedule:
    """UniPC or DPM-Solver++ with use_flow_sigmas (Wan's default: UniPC, flow_shift 3 or 5, 50 steps)."""
    order = _pipeline_sampler(r, "", sampler, flow=True)["order"]
    if r.c["prediction_type"] != "flow_prediction":
        r.fail("prediction_type", "flow sigmas are read with flow_prediction (the velocity noise - x0)")
    if r.c.get("thresholding"):
        r.fail("thresholding", "dynamic thresholding is not reproduced")
    fields = _shift_fields(r, seq_len)
    if sampler == "dpm++" and fields.get("shift_terminal") is not None:
        r.fail("shift_terminal", "DPM-Solver++ has no shift_terminal")
    if sampler == "dpm++" and fields.get("dynamic_shift") and fields["time_shift"] != "exponential":
        r.fail("time_shift_type", "DPM-Solver++ shifts dynamically by exp(mu) only")
    fields["shift"] = float(r.get("flow_shift", v.number, 0, None, True))
    return _flow_schedule(r, **fields, sampler=sampler, steps=50, order=order)
