"""EasyRef: Omni-Generalized Group Image Reference for Diffusion Models via Multimodal LLM (Zong et al.,
arXiv 2412.09618), with the embedding-mean (IP-Adapter, arXiv 2308.06721) baseline on the same adapter.

    refs x_1..x_N --CLIP vision tower--> tokens (N, T, Dv) --projector--> (N, T, w)
    [instruction tokens ; image tokens of x_1..x_N ; M learnable reference tokens]  --causal LM-->
    the LM's states at the M reference tokens --readout--> c (M, D_cross): the group's consistent elements

Decoupled cross-attention in every UNet cross-attention layer (IP-Adapter's Eq. 5):

    Z = Attn(Q, K_text, V_text) + lambda · Attn(Q, c W_k', c W_v')      W_k', W_v' start as copies of W_k, W_v

The paper's LM is Qwen2-VL-2B; the embedded SmolLM2-135M with a trained projector is the issue's other
choice, too heavy for this CPU. The stand-in here is a tiny causal transformer (`width` x `layers`),
trained from scratch, with its own token embedding over the diffusion tokenizer's ids.
Progressive training (the paper's alignment pretraining, then the adapter): stage 1 trains projector,
LM, reference tokens and readout on single references through the adapter frozen at its initial
copy of W_k, W_v (the tokens learn to speak the text tower's language); stage 2 freezes the
projector and trains the adapter, the LM, the reference tokens and the readout on reference groups.
The baseline `mean` encodes mean_i E(x_i) (normalised CLIP embeddings) as M tokens (Linear + LayerNorm,
IP-Adapter's projection) and trains projection and adapter together for the same total steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.core.errors import AdapterError, LoraforgeError, ModelNotFoundError
from loraforge.core.files import atomic_dir
from loraforge.personalize.references import Subject, read_subjects
from loraforge.personalize.sampling import fingerprint
from loraforge.vision.clip import image_features, load_clip, pixels
from loraforge.vision.datadream import load_diffusion
from loraforge.vision.glyphs import signed_pixels
from loraforge.vision.unet_testbed import text_states

KIND = "easyref"
RECORD, WEIGHTS = "easyref.json", "easyref.safetensors"
ENCODERS = ("easyref", "mean")


@dataclass
class EasyRefConfig:
    encoder: str = "easyref"  # or "mean": the embedding-mean baseline through the same adapter
    tokens: int = 4  # M reference tokens
    width: int = 64  # the stand-in LM's width
    layers: int = 2
    heads: int = 4
    instruction: str = "a character"  # what the LM is asked to keep from the group
    scale: float = 1.0  # lambda of the decoupled attention
    align_steps: int = 150
    adapter_steps: int = 150
    lr: float = 1e-3
    subjects_per_step: int = 8
    targets_per_subject: int = 4
    references: int = 3
    max_references: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise LoraforgeError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")


class ReferenceLM(nn.Module):
    """The multi-reference encoder: projector, tiny causal LM (stand-in), learnable reference tokens, readout."""

    def __init__(self, vision_dim: int, vocab: int, cross_dim: int, config: EasyRefConfig, max_tokens: int = 256):
        super().__init__()
        w = config.width
        self.projector = nn.Sequential(nn.Linear(vision_dim, w), nn.GELU(), nn.Linear(w, w))
        self.embed = nn.Embedding(vocab, w)
        self.position = nn.Parameter(torch.randn(max_tokens, w) * 0.02)
        self.image_index = nn.Parameter(torch.randn(config.max_references, w) * 0.02)  # which reference a token is from
        layer = nn.TransformerEncoderLayer(w, config.heads, 2 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.lm = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.reference_tokens = nn.Parameter(torch.randn(config.tokens, w) * 0.02)
        self.readout = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cross_dim))
        self.max_references = config.max_references

    def forward(self, vision_tokens: torch.Tensor, instruction_ids: torch.Tensor) -> torch.Tensor:
        """vision_tokens (S, N, T, Dv), instruction_ids (L,) -> reference tokens (S, M, D_cross)."""
        s, n = vision_tokens.shape[:2]
        if n > self.max_references:
            raise LoraforgeError(f"{n} references: this encoder reads at most {self.max_references}")
        images = self.projector(vision_tokens) + self.image_index[:n, None]  # (S, N, T, w)
        text = self.embed(instruction_ids).expand(s, -1, -1)  # (S, L, w)
        seq = torch.cat([text, images.flatten(1, 2), self.reference_tokens.expand(s, -1, -1)], 1)  # (S, L+NT+M, w)
        if seq.shape[1] > len(self.position):
            raise LoraforgeError(f"{seq.shape[1]} tokens: more than the encoder's {len(self.position)} positions")
        seq = seq + self.position[: seq.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(seq.shape[1])
        out = self.lm(seq, mask=causal, is_causal=True)
        return self.readout(out[:, -len(self.reference_tokens):])  # (S, M, D_cross)


class MeanEmbedding(nn.Module):
    """IP-Adapter's projection of the mean image embedding to M tokens (the baseline)."""

    def __init__(self, feature_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(feature_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (S, N, D) -> (S, M, D_cross)."""
        return self.norm(self.proj(features.mean(1)).reshape(len(features), self.tokens, -1))


class DecoupledAttention(nn.Module):
    """A diffusers attention processor: text cross-attention plus lambda x attention to the last M tokens."""

    def __init__(self, attn: nn.Module, tokens: int, scale: float):
        super().__init__()
        self.tokens, self.scale = tokens, scale
        self.to_k_ip = nn.Linear(attn.to_k.in_features, attn.to_k.out_features, bias=False)
        self.to_v_ip = nn.Linear(attn.to_v.in_features, attn.to_v.out_features, bias=False)
        with torch.no_grad():  # IP-Adapter's start: the text projections
            self.to_k_ip.weight.copy_(attn.to_k.weight)
            self.to_v_ip.weight.copy_(attn.to_v.weight)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or attn.norm_cross or attn.group_norm is not None or attn.spatial_norm is not None \
                or attn.residual_connection or hidden_states.dim() != 3 or attention_mask is not None:
            raise LoraforgeError("decoupled attention supports plain cross-attention layers (3-d states, no mask or norms)")
        text, refs = encoder_hidden_states[:, : -self.tokens], encoder_hidden_states[:, -self.tokens:]
        b = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # (B, h, T, d)

        q = heads(attn.to_q(hidden_states))
        z = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        z_ip = F.scaled_dot_product_attention(q, heads(self.to_k_ip(refs)), heads(self.to_v_ip(refs)))
        z = (z + self.scale * z_ip).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])  # (B, T, inner)
        return attn.to_out[1](attn.to_out[0](z)) / attn.rescale_output_factor


def install_adapter(unet: nn.Module, tokens: int, scale: float) -> nn.ModuleDict:
    """Decoupled attention on every cross-attention layer (attn2); the others keep diffusers' own processor."""
    processors, adapter = {}, nn.ModuleDict()
    for name in unet.attn_processors:
        if ".attn2." in name:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            processors[name] = adapter[name.replace(".", "__")] = DecoupledAttention(attn, tokens, scale)
        else:
            processors[name] = AttnProcessor2_0()
    if not len(adapter):
        raise LoraforgeError("the UNet has no cross-attention layers (attn2) for the reference adapter")
    unet.set_attn_processor(processors)
    return adapter


@torch.no_grad()
def vision_inputs(clip: nn.Module, processor: object, images: torch.Tensor, kind: str) -> torch.Tensor:
    """What each encoder reads per image: the vision tower's tokens (N, T, Dv) or the embedding (N, D)."""
    px = pixels(processor, images)
    if kind == "mean":
        return image_features(clip, px)
    return clip.vision_model(pixel_values=px).last_hidden_state


class EasyRef(nn.Module):
    """Encoder + adapter, bound to one diffusion UNet (installed) and one CLIP."""

    def __init__(self, unet: nn.Module, clip: nn.Module, tokenizer: object, config: EasyRefConfig):
        super().__init__()
        self.config = config
        cross = unet.config.cross_attention_dim
        if config.encoder == "mean":
            self.encoder: nn.Module = MeanEmbedding(clip.config.projection_dim, cross, config.tokens)
        else:
            self.encoder = ReferenceLM(clip.config.vision_config.hidden_size, len(tokenizer), cross, config)
        self.adapter = install_adapter(unet, config.tokens, config.scale)
        self.register_buffer("instruction", torch.tensor(tokenizer(config.instruction)["input_ids"]), persistent=False)

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-subject inputs (S, N, ...) -> reference tokens (S, M, D_cross)."""
        return self.encoder(inputs) if self.config.encoder == "mean" else self.encoder(inputs, self.instruction)


def train_easyref(diffusion: str | Path, encoder: str | Path, subjects: list[Subject] | str | Path, out: str | Path,
                  config: EasyRefConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Progressive training (alignment, then the adapter); write OUT/easyref.json + easyref.safetensors."""
    config = config or EasyRefConfig()
    unet, scheduler, text_encoder, tokenizer = load_diffusion(diffusion)
    clip, processor, _ = load_clip(encoder)
    subjects = read_subjects(subjects, unet.config.sample_size) if isinstance(subjects, (str, Path)) else subjects
    torch.manual_seed(config.seed)
    model = EasyRef(unet, clip, tokenizer, config)
    for m in (unet, text_encoder, clip):
        m.requires_grad_(False).eval()
    inputs = [vision_inputs(clip, processor, s.images, config.encoder) for s in subjects]
    x0 = [signed_pixels(s.images) for s in subjects]
    with torch.no_grad():
        states = {p: text_states(text_encoder, tokenizer, [p])[0] for p in {s.prompt for s in subjects}}
    if config.encoder == "mean":  # one stage, the same total budget
        stages = [("joint", list(model.parameters()), config.references, config.align_steps + config.adapter_steps)]
    else:
        lm = model.encoder
        stages = [("align", list(lm.parameters()), 1, config.align_steps),
                  ("adapter", [p for n, p in lm.named_parameters() if not n.startswith("projector.")]
                   + list(model.adapter.parameters()), config.references, config.adapter_steps)]
    generator = torch.Generator().manual_seed(config.seed)
    history, start = [], time.monotonic()
    for stage, params, n_refs, steps in stages:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        for step in range(steps):
            chosen = torch.randperm(len(subjects), generator=generator)[: config.subjects_per_step].tolist()
            refs = torch.stack([inputs[i][torch.randperm(len(inputs[i]), generator=generator)[:n_refs]] for i in chosen])
            k = config.targets_per_subject
            target = torch.cat([x0[i][torch.randint(0, len(x0[i]), (k,), generator=generator)] for i in chosen])
            cond = torch.stack([states[subjects[i].prompt] for i in chosen]).repeat_interleave(k, 0)  # (S k, L, D)
            tokens = model.tokens(refs).repeat_interleave(k, 0)  # (S k, M, D)
            noise = torch.randn(target.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(target),), generator=generator)
            pred = unet(scheduler.add_noise(target, noise, t), t, encoder_hidden_states=torch.cat([cond, tokens], 1)).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if (step + 1) % 25 == 0 or step + 1 == steps:
                history.append({"stage": stage, "step": step + 1, "loss": round(loss.item(), 5),
                                "seconds": round(time.monotonic() - start, 1)})
                log(f"easyref {config.encoder} {stage} step {step + 1}/{steps}: loss {loss.item():.4f}")
    record = {"kind": KIND, "config": dataclasses.asdict(config),
              "diffusion": {"path": str(Path(diffusion).resolve()), "fingerprint": fingerprint(unet)},
              "encoder": {"path": str(Path(encoder).resolve())}, "subjects": len(subjects), "history": history}
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


class TrainedEasyRef:
    """A saved EasyRef (or mean baseline), installed on `unet`: `tokens(images)` -> (1, M, D_cross)."""

    def __init__(self, folder: str | Path, unet: nn.Module, tokenizer: object, where: str | Path,
                 encoder: str | Path | None = None):
        folder = Path(folder)
        if not (folder / RECORD).is_file():
            raise ModelNotFoundError(f"{folder}: no {RECORD} (train one with `loraforge easyref train`)")
        record = json.loads((folder / RECORD).read_text())
        if record.get("kind") != KIND:
            raise AdapterError(f"{folder}: a {record.get('kind')!r} record, not an {KIND} one")
        if fingerprint(unet) != record["diffusion"]["fingerprint"]:
            raise AdapterError(f"{where}: not the diffusion model this EasyRef was trained for "
                               f"({record['diffusion']['path']})")
        self.config = EasyRefConfig(**record["config"])
        self.clip, self.processor, _ = load_clip(encoder or record["encoder"]["path"])
        self.model = EasyRef(unet, self.clip, tokenizer, self.config)
        self.model.load_state_dict(load_file(str(folder / WEIGHTS)))
        self.model.eval()

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.tokens(vision_inputs(self.clip, self.processor, images, self.config.encoder)[None])
