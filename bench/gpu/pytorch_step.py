"""The PyTorch + diffusers side of bench/gpu/run.sh: the same SD2-base UNet training step as
`gpu_train_step` (config written by it), on the same GPU, for the ratio.

UNet2DConditionModel from the config, random init, f32 master weights with bf16 autocast,
SDPA attention (diffusers' default AttnProcessor2_0), AdamW(lr=1e-4, weight_decay=1e-2),
DDPM noising with per-sample timesteps, epsilon MSE loss. Prints one JSON line per batch size.

usage: pytorch_step.py --config unet_config.json [--batches 8,32,64] [--steps 10] [--warmup 3]
"""

import argparse
import json
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--batches", default="8,32,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except Exception as e:  # noqa: BLE001 - report why the baseline could not run
        print(json.dumps({"framework": "pytorch", "error": f"cannot import torch/diffusers: {e}"}))
        return 1
    config = json.load(open(a.config))
    failed = False
    for batch in [int(b) for b in a.batches.split(",")]:
        try:
            print(json.dumps(step(torch, UNet2DConditionModel, config, batch, a.steps, a.warmup)), flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
            failed = True
            print(json.dumps({"framework": "pytorch", "batch": batch, "error": str(e)}), flush=True)
        torch.cuda.empty_cache()
    return 1 if failed else 0


def step(torch, UNet2DConditionModel, config, batch, steps, warmup):
    torch.manual_seed(0)
    device = torch.device("cuda:0")
    unet = UNet2DConditionModel.from_config(config).to(device).train()
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(device)
    latents = torch.randn(batch, 4, 32, 32, device=device)
    text = torch.randn(batch, 77, 1024, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    times, loss_value = [], float("nan")
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(latents)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    return {
        "framework": "pytorch",
        "torch": torch.__version__,
        "batch": batch,
        "params": params,
        "steps": steps,
        "step_s_median": median,
        "images_per_s": batch / median,
        "peak_gpu_gib_allocated": torch.cuda.max_memory_allocated(device) / 2**30,
        "last_loss": loss_value,
    }


if __name__ == "__main__":
    sys.exit(main())
