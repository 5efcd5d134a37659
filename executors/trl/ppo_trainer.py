"""A compact PPO for causal LMs, run in the trainer process by launch.py (see ppo.py for why).

One step: sample completions for `batch_size` prompts per rank; score them (built-in reward
functions, a reward model); per-token rewards = -kl_coef * (log pi - log pi_ref) plus the
score on the last token; GAE over a value head on the policy's last hidden state; then
`ppo_epochs` passes of `num_mini_batches` updates with the clipped surrogate and clipped
value loss. Ranks all-reduce gradients (no DDP wrapper, so LoRA and gloo need nothing
special). Dropout is off, so old and new log-probabilities come from the same function.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executors.trl.data import load
from executors.trl.launch import (
    STEP_PAUSE,
    Events,
    common_args,
    load_model,
    load_tokenizer,
    lora_config,
)
from executors.trl.rewards import RewardSpec, combined


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def _prompt_text(tokenizer: Any, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        )
    return "\n".join(m["content"] for m in prompt)


class _Scorer:
    """The scalar reward of each (prompt, completion): weighted built-in functions plus
    the reward model's first logit."""

    def __init__(self, job: dict[str, Any], device: torch.device) -> None:
        from pydantic import TypeAdapter

        specs = TypeAdapter(list[RewardSpec]).validate_python(job["options"]["rewards"])
        self.fn = combined(specs) if specs else None
        self.model = self.tokenizer = None
        if job["reward_model"]:
            from transformers import AutoModelForSequenceClassification

            self.tokenizer = load_tokenizer(job["reward_model"], job["trust_remote_code"])
            self.tokenizer.padding_side = "right"
            self.model = (
                AutoModelForSequenceClassification.from_pretrained(
                    job["reward_model"], trust_remote_code=job["trust_remote_code"]
                )
                .to(device)
                .eval()
            )
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        scores = torch.zeros(len(completions), device=self.device)
        if self.fn is not None:
            scores += torch.tensor(self.fn(completions, prompts=prompts), device=self.device)
        if self.model is not None and self.tokenizer is not None:
            enc = self.tokenizer(
                [p + c for p, c in zip(prompts, completions, strict=True)],
                return_tensors="pt", padding=True, truncation=True, max_length=2048,
            ).to(self.device)  # fmt: skip
            scores += self.model(**enc).logits[:, 0].float()
        return scores


class Ppo:
    def __init__(self, job: dict[str, Any], half: str, events: Events, say: Callable[[str], None]):
        self.job, self.o, self.events, self.say = job, job["options"], events, say
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        self.half = half
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16 if half == "bf16" else torch.float16)
            if cuda and half in ("bf16", "fp16") else nullcontext()
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and half == "fp16")

        self.tokenizer = load_tokenizer(job["model"], job["trust_remote_code"])
        self.tokenizer.padding_side = "left"
        dataset = load(job["data"], "prompt")
        self.prompts = [_prompt_text(self.tokenizer, row["prompt"]) for row in dataset]
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        resume = job["resume"]
        lora = job["lora"]
        # A full-weight checkpoint is the policy itself; a LoRA one is loaded over the base.
        self.policy = load_model(job, resume if resume and not lora else job["model"], half)
        config = lora_config(job)
        if config is not None:
            from peft import get_peft_model

            self.policy = get_peft_model(self.policy, config)
        self.ref = None
        if not lora:
            self.ref = load_model({**job, "init_adapter": None}, job["model"], half)
            self.ref.requires_grad_(False).eval().to(self.device)
        for model in (self.policy, self.ref):
            for m in model.modules() if model is not None else ():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        if self.o["gradient_checkpointing"]:
            self.policy.gradient_checkpointing_enable()
            if lora:
                self.policy.enable_input_require_grads()
        self.policy.to(self.device).train()
        hidden = self.policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1).to(self.device)
        nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.params += list(self.value_head.parameters())
        self.scorer = _Scorer(job, self.device)

        args = common_args(job, half)
        self.per_step = self.o["batch_size"] * self.world
        if self.o["max_steps"]:
            self.total = int(self.o["max_steps"])
        else:
            self.total = max(
                1, math.ceil((self.o["epochs"] or 1.0) * len(self.prompts) / self.per_step)
            )
        updates = self.o["ppo_epochs"] * self.o["num_mini_batches"]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=args["learning_rate"], weight_decay=self.o["weight_decay"]
        )
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            self.o["lr_scheduler"], self.optimizer,
            num_warmup_steps=self.o["warmup_steps"] * updates,
            num_training_steps=self.total * updates,
        )  # fmt: skip
        self.step = 0
        if resume:
            self._load(Path(resume))

    # -- data ------------------------------------------------------------------------------

    def _batch(self, step: int) -> list[str]:
        """This rank's prompts for `step`: consecutive slices of per-epoch shuffles, so a
        resumed run sees the prompts the interrupted one would have."""
        n, b = len(self.prompts), self.o["batch_size"]
        start = step * self.per_step + self.rank * b
        out = []
        for pos in range(start, start + b):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.o["seed"] + epoch)
            )
            out.append(self.prompts[int(perm[i])])
        return out

    # -- model passes ------------------------------------------------------------------

    def _forward(
        self, model: Any, seq: torch.Tensor, attn: torch.Tensor, plen: int, values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities of the response tokens (and the values before each)."""
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        with self.autocast:
            out = model(
                input_ids=seq,
                attention_mask=attn,
                position_ids=pos,
                output_hidden_states=values,
                use_cache=False,
            )
        logits = out.logits[:, plen - 1 : -1].float() / self.o["temperature"]
        logprobs = torch.log_softmax(logits, -1).gather(-1, seq[:, plen:, None]).squeeze(-1)
        if not values:
            return logprobs, None
        hidden = out.hidden_states[-1][:, plen - 1 : -1].float()
        return logprobs, self.value_head(hidden).squeeze(-1)

    @torch.no_grad()
    def _rollout(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        from transformers import GenerationConfig

        tok = self.tokenizer
        max_prompt = max(8, self.o["max_seq_length"] - self.o["max_completion_length"])
        enc = tok(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_prompt,
            add_special_tokens=not self.templated,
        ).to(self.device)
        eos = tok.eos_token_id
        config = GenerationConfig(
            max_new_tokens=self.o["max_completion_length"], do_sample=True,
            temperature=self.o["temperature"], top_k=0, top_p=1.0,
            pad_token_id=tok.pad_token_id, eos_token_id=eos,
        )  # fmt: skip
        self.policy.eval()
        with self.autocast:
            seq = self.policy.generate(**enc, generation_config=config)
        self.policy.train()
        plen = enc["input_ids"].shape[1]
        response = seq[:, plen:]
        # Every token up to and including the first EOS counts; what follows is padding.
        is_eos = (
            (response == eos) if eos is not None else torch.zeros_like(response, dtype=torch.bool)
        )
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        mask = (~after).float()
        attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        logprobs, values = self._forward(self.policy, seq, attn, plen, values=True)
        if self.ref is not None:
            ref_logprobs, _ = self._forward(self.ref, seq, attn, plen, values=False)
        else:
            with self.policy.disable_adapter():
                ref_logprobs, _ = self._forward(self.policy, seq, attn, plen, values=False)
        texts = tok.batch_decode(
            [r[: int(m.sum())] for r, m in zip(response, mask, strict=True)],
            skip_special_tokens=True,
        )
        scores = self.scorer(prompts, texts)
        assert values is not None
        values = values * mask
        kl = (logprobs - ref_logprobs) * mask
        rewards = -self.o["kl_coef"] * kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(prompts)), last] += scores
        advantages = torch.zeros_like(rewards)
        gae = torch.zeros(len(prompts), device=self.device)
        for t in reversed(range(rewards.shape[1])):
            following = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
            delta = rewards[:, t] + self.o["gamma"] * following - values[:, t]
            gae = delta + self.o["gamma"] * self.o["lam"] * gae
            advantages[:, t] = gae
        advantages = advantages * mask
        returns = advantages + values
        if self.o["whiten_advantages"]:
            advantages = _whiten(advantages, mask)
        return {
            "seq": seq,
            "attn": attn,
            "mask": mask,
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,
            "kl": kl.sum(1),
            "plen": torch.tensor(plen),
        }

    def _update(self, r: dict[str, torch.Tensor]) -> tuple[float, float]:
        o = self.o
        plen = int(r["plen"])
        size = len(r["seq"]) // o["num_mini_batches"]
        losses, clipped = [], []
        for _ in range(o["ppo_epochs"]):
            order = torch.randperm(len(r["seq"]), device=self.device)
            for start in range(0, len(order), size):
                i = order[start : start + size]
                mask = r["mask"][i]
                logprobs, values = self._forward(self.policy, r["seq"][i], r["attn"][i], plen, True)
                assert values is not None
                ratio = torch.exp(logprobs - r["logprobs"][i])
                adv = r["advantages"][i]
                pg = torch.max(
                    -adv * ratio, -adv * ratio.clamp(1 - o["cliprange"], 1 + o["cliprange"])
                )
                pg_loss = _masked_mean(pg, mask)
                old_v = r["values"][i]
                v_clip = old_v + (values - old_v).clamp(-o["cliprange_value"], o["cliprange_value"])
                ret = r["returns"][i]
                vf = torch.max((values - ret) ** 2, (v_clip - ret) ** 2)
                loss = pg_loss + o["vf_coef"] * 0.5 * _masked_mean(vf, mask)
                self.scaler.scale(loss).backward()
                self._all_reduce()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, o["max_grad_norm"])
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                outside = ((ratio - 1).abs() > o["cliprange"]).float()
                clipped.append(float(_masked_mean(outside, mask)))
        return sum(losses) / len(losses), sum(clipped) / len(clipped)

    def _all_reduce(self) -> None:
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    # -- checkpoints -------------------------------------------------------------------

    def _save(self) -> None:
        out = Path(self.job["output_dir"])
        final = out / f"checkpoint-{self.step}"
        tmp = out / f".checkpoint-{self.step}.partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(
            {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            tmp / f"rng_state_{self.rank}.pth",
        )  # fmt: skip
        if self.rank == 0:
            self.policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            torch.save(self.value_head.state_dict(), tmp / "value_head.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            state = {"global_step": self.step, "max_steps": self.total}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._rotate(out)
            self.events.emit("checkpoint", path=str(final), step=self.step)

    def _rotate(self, out: Path) -> None:
        limit = self.o["save_total_limit"]
        if not limit:
            return
        kept = sorted(
            (p for p in out.glob("checkpoint-*") if p.name.rpartition("-")[2].isdigit()),
            key=lambda p: int(p.name.rpartition("-")[2]),
        )
        for old in kept[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, ckpt: Path) -> None:
        if self.job["lora"]:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(
                self.policy, load_file(str(ckpt / "adapter_model.safetensors"))
            )
        load = lambda name: torch.load(ckpt / name, map_location=self.device, weights_only=False)  # noqa: E731
        self.value_head.load_state_dict(load("value_head.pt"))
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if (ckpt / "scaler.pt").exists():
            self.scaler.load_state_dict(load("scaler.pt"))
        rng = ckpt / f"rng_state_{self.rank}.pth"
        if rng.exists():
            state = torch.load(rng, weights_only=False)
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if state["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
        self.step = int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    # -- the loop ----------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        o = self.o
        self.events.started = True
        self.say(
            f"ppo: {len(self.prompts)} prompts, {self.total} steps, world size {self.world}, "
            f"precision {self.half}"
        )
        self.events.emit("progress", step=self.step, total=self.total, epoch=self._epoch())
        losses: list[float] = []
        reward = kl = 0.0
        while self.step < self.total:
            rollout = self._rollout(self._batch(self.step))
            loss, clipfrac = self._update(rollout)
            self.step += 1
            if STEP_PAUSE:
                time.sleep(STEP_PAUSE)  # FLOWMESH_FAILPOINTS=train_step:S, crash tests only
            losses.append(loss)
            reward = float(rollout["scores"].mean())
            kl = float(rollout["kl"].mean())
            if self.step % o["logging_steps"] == 0 or self.step in (1, self.total):
                lr = self.scheduler.get_last_lr()[0]
                self.say(
                    f"step {self.step}/{self.total} loss {loss:.4f} reward {reward:.4f} "
                    f"kl {kl:.4f} clipfrac {clipfrac:.3f} lr {lr:.3g}"
                )
                self.events.emit(
                    "progress",
                    step=self.step,
                    total=self.total,
                    loss=loss,
                    learning_rate=lr,
                    epoch=self._epoch(),
                    reward=reward,
                    kl=kl,
                    clipfrac=clipfrac,
                )
            if o["save_steps"] and self.step % o["save_steps"] == 0:
                self._save()
        final = Path(self.job["final_dir"])
        if self.rank == 0:
            self.policy.save_pretrained(final)
            self.tokenizer.save_pretrained(final)
        self._barrier()
        return {
            "global_step": self.step,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "metrics": {"reward": reward, "kl": kl},
            "world_size": self.world,
        }

    def _epoch(self) -> float:
        return round(self.step * self.per_step / len(self.prompts), 4)


def train(
    job: dict[str, Any], half: str, events: Events, say: Callable[[str], None]
) -> dict[str, Any]:
    return Ppo(job, half, events, say).train()
