#!/usr/bin/env python3
"""Writes the scheduler parity fixtures in tests/fixtures/schedulers/ with diffusers.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/schedulers.py

Outputs
  configs/<name>.json         scheduler_config.json files, read by the Rust test as-is
  cases.json                  one entry per sampler run: sampler, config, steps, eta,
                              timesteps, init_noise_sigma; plus the schedule checks
  trajectories.safetensors    x_init, r1, r2, noise[step] (shared) and per case
                              `<case>.samples` (sample after every step) and, for the
                              Euler samplers, `<case>.model_inputs`
  schedules.safetensors       betas / alphas_cumprod per config, add_noise and
                              velocity of a batch with per-sample timesteps

The denoiser is a stand-in that feeds the trajectory back into itself:
    model_output = 0.5 * model_input * r1 + (t / 1000) * r2
where model_input is scale_model_input(sample) and t the timestep the UNet
would receive (a float for Euler). The Rust test computes the same function.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.training_utils import compute_snr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "schedulers")
SHAPE = (1, 4, 4, 4)
MAX_STEPS = 16

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

# name -> (config json, number of inference steps)
CONFIGS = {}
for pred, suffix in [("epsilon", "eps"), ("v_prediction", "v")]:
    # SD 1.5's scheduler_config.json (no timestep_spacing: each class's default applies).
    sd15 = {"_class_name": "PNDMScheduler", **SD, "clip_sample": False, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    if pred != "epsilon":
        sd15["prediction_type"] = pred
    CONFIGS[f"sd15_{suffix}"] = (sd15, 10)
    # SD 2.x style with trailing spacing; 1000 / 16 = 62.5 exercises round-half-even,
    # 16 >= 15 steps exercises DPM-Solver's second-order path up to the last step.
    CONFIGS[f"sd2_trailing_{suffix}"] = (
        {"_class_name": "DDIMScheduler", **SD, "clip_sample": False, "set_alpha_to_one": False,
         "steps_offset": 1, "timestep_spacing": "trailing", "prediction_type": pred},
        16,
    )
    # Cosine schedule, leading spacing, DDIM clipping, DPM lambda clipping.
    CONFIGS[f"cosine_leading_{suffix}"] = (
        {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
         "num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1,
         "clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True,
         "lambda_min_clipped": -2.5, "prediction_type": pred, "some_future_field": [1, 2]},
        12,
    )
    # Linear betas with diffusers' defaults otherwise (DDIM: clip_sample, set_alpha_to_one),
    # linspace spacing, sigma_min final sigma, Python's -Infinity literal.
    CONFIGS[f"linear_linspace_{suffix}"] = (
        {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "linear",
         "timestep_spacing": "linspace", "final_sigmas_type": "sigma_min",
         "lambda_min_clipped": -float("inf"), "prediction_type": pred},
        15,
    )

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

# (sampler, config, eta) beyond the full sampler x config product (eta 0).
EXTRA = [("ddim", "sd15_eps", 0.5), ("ddim", "sd2_trailing_v", 1.0), ("ddim", "cosine_leading_eps", 0.3)]


def main():
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    diffusers.utils.logging.set_verbosity_error()  # unexpected config keys are on purpose
    os.makedirs(os.path.join(OUT, "configs"), exist_ok=True)
    g = torch.Generator().manual_seed(20240601)
    x_init = torch.randn(SHAPE, generator=g)
    r1 = torch.randn(SHAPE, generator=g)
    r2 = torch.randn(SHAPE, generator=g)
    noise = torch.randn((MAX_STEPS,) + SHAPE, generator=g)
    tensors = {"x_init": x_init, "r1": r1, "r2": r2, "noise": noise}

    def model(x_in, t):
        return 0.5 * x_in * r1 + (t / 1000.0) * r2

    for name, (cfg, _) in CONFIGS.items():
        with open(os.path.join(OUT, "configs", f"{name}.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)  # writes -Infinity like diffusers

    runs = [(s, c, 0.0) for c in CONFIGS for s in SAMPLERS] + EXTRA
    cases = []
    for sampler, cfg_name, eta in runs:
        cfg, steps = CONFIGS[cfg_name]
        sched = SAMPLERS[sampler].from_config(dict(cfg))
        sched.set_timesteps(steps)
        case = f"{sampler}_{cfg_name}" + (f"_eta{eta}" if eta else "")
        x = x_init * sched.init_noise_sigma
        samples, inputs = [], []
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            out = model(x_in, float(t))
            if sampler == "ddim":
                x = sched.step(out, t, x, eta=eta, variance_noise=noise[i] if eta > 0 else None).prev_sample
            elif sampler == "euler-a":
                euler_a_module.randn_tensor = lambda *a, _n=noise[i], **k: _n.clone()
                x = sched.step(out, t, x).prev_sample
            else:
                x = sched.step(out, t, x).prev_sample
            samples.append(x)
            inputs.append(x_in)
        tensors[f"{case}.samples"] = torch.stack(samples)
        if sampler in ("euler", "euler-a"):
            tensors[f"{case}.model_inputs"] = torch.stack(inputs)
        cases.append({
            "name": case,
            "sampler": sampler,
            "config": f"configs/{cfg_name}.json",
            "steps": steps,
            "eta": eta,
            "timesteps": [float(t) for t in sched.timesteps],
            "init_noise_sigma": float(sched.init_noise_sigma),
            "sigmas": [float(s) for s in sched.sigmas] if hasattr(sched, "sigmas") and sampler != "ddim" else None,
        })

    # Forward process (DDPMScheduler, what the training scripts use).
    sched_tensors = {}
    schedules = []
    gs = torch.Generator().manual_seed(7)
    x0 = torch.randn((3, 4, 4, 4), generator=gs)
    eps = torch.randn((3, 4, 4, 4), generator=gs)
    sched_tensors["x0"], sched_tensors["noise"] = x0, eps
    timesteps = torch.tensor([0, 421, 999])
    snr_timesteps = torch.tensor([0, 1, 250, 500, 750, 998, 999])
    for cfg_name in ["sd15_eps", "sd2_trailing_v", "cosine_leading_eps", "linear_linspace_v"]:
        cfg, _ = CONFIGS[cfg_name]
        ddpm = DDPMScheduler.from_config(dict(cfg))
        sched_tensors[f"{cfg_name}.betas"] = ddpm.betas
        sched_tensors[f"{cfg_name}.alphas_cumprod"] = ddpm.alphas_cumprod
        sched_tensors[f"{cfg_name}.noisy"] = ddpm.add_noise(x0, eps, timesteps)
        sched_tensors[f"{cfg_name}.velocity"] = ddpm.get_velocity(x0, eps, timesteps)
        schedules.append({
            "config": f"configs/{cfg_name}.json",
            "name": cfg_name,
            "prediction_type": ddpm.config.prediction_type,
            "timesteps": timesteps.tolist(),
            "snr_timesteps": snr_timesteps.tolist(),
            "snr": compute_snr(ddpm, snr_timesteps).tolist(),
        })

    for fname, ts in [("trajectories.safetensors", tensors), ("schedules.safetensors", sched_tensors)]:
        path = os.path.join(OUT, fname)
        save_file({k: v.contiguous().float() for k, v in ts.items()}, path)
        os.chmod(path, 0o644)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__,
                   "model_output": "0.5 * model_input * r1 + (t / 1000) * r2",
                   "cases": cases, "schedules": schedules}, f, indent=1)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"{len(cases)} sampler cases, {len(schedules)} schedules, {total / 1024:.0f} KiB in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
