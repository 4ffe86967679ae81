"""The PyTorch + diffusers side of a UNet training-step benchmark, for the ratio: on a GPU the
SD2-base step of bench/gpu/run.sh (config written by `gpu_train_step`), on the CPU the tiny-UNet
step of `cargo bench --bench training_step` (config written by it).

UNet2DConditionModel from the config, random init, f32 master weights (bf16 autocast on CUDA,
plain fp32 on the CPU), SDPA attention (diffusers' default AttnProcessor2_0),
AdamW(lr=1e-4, weight_decay=1e-2), gradient clipping to norm 1, DDPM noising with per-sample
timesteps, epsilon MSE loss. Text embeddings are 77 x the config's `cross_attention_dim`.
Prints one JSON line per batch size.

usage: pytorch_step.py --config unet_config.json [--device cuda|cpu] [--latent-size 32]
                       [--batches 8,32,64] [--steps 10] [--warmup 3]
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
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--latent-size", type=int, default=32)
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
            print(json.dumps(step(torch, UNet2DConditionModel, config, batch, a)), flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
            failed = True
            print(json.dumps({"framework": "pytorch", "batch": batch, "error": str(e)}), flush=True)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


def step(torch, UNet2DConditionModel, config, batch, a):
    torch.manual_seed(0)
    cuda = a.device == "cuda"
    device = torch.device("cuda:0" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    unet = UNet2DConditionModel.from_config(config).to(device).train()
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(device)
    size = a.latent_size
    latents = torch.randn(batch, config.get("in_channels", 4), size, size, device=device)
    text = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, loss_value = [], float("nan")
    for i in range(a.warmup + a.steps):
        sync()
        started = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(latents)
        alpha = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1.0 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        noisy = alpha * latents + sigma * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pred = unet(noisy, t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - started)
    times.sort()
    median = times[len(times) // 2]
    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "params": params,
        "steps": a.steps,
        "step_s_median": median,
        "images_per_s": batch / median,
        "last_loss": loss_value,
    }
    if cuda:
        result["peak_gpu_gib_allocated"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


if __name__ == "__main__":
    sys.exit(main())
