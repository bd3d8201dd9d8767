"""A tiny random Qwen2.5-VL and an offline tokenizer, saved as an ordinary model directory, so that everything
(train.py, infer.py, the tests) runs on a CPU with no download through the same code path as real weights.
Also writes a small sample data set in the GAP JSONL format (paper appendix I; README "Data format") to try the pipeline on.

    python tiny.py --out out/tiny --sample_data out/sample     # then: python train.py --model out/tiny ...
"""
import dataclasses
import json
import os
import random

from PIL import Image, ImageDraw

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


@dataclasses.dataclass
class TinyConfig:
    """Build a tiny random Qwen2.5-VL model directory (and optionally sample data)."""
    out: str = dataclasses.field(default="out/tiny", metadata={"help": "model directory to write"})
    sample_data: str = dataclasses.field(default="", metadata={"help": "also write sample JSONL + PNGs here"})
    n_examples: int = dataclasses.field(default=32, metadata={"help": "sample examples to write"})
    hidden: int = dataclasses.field(default=64, metadata={"help": "decoder width (the latent dimension d)"})
    layers: int = dataclasses.field(default=2, metadata={"help": "decoder layers"})
    vocab: int = dataclasses.field(default=600, metadata={"help": "BPE vocabulary size before specials"})
    seed: int = dataclasses.field(default=0, metadata={"help": "weights and data seed"})


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def sample_example(rng, i, img_dir):
    """One example of a small counting task: the query image has circles of several colours, the auxiliary
    image keeps only the asked colour, the answer is their count. Image widths and reasoning lengths vary, so
    examples differ in length (what padding, packing and the loss normalization are tested on)."""
    color = rng.choice(sorted(COLORS))
    counts = {c: rng.randint(0, 4) for c in COLORS}
    width = rng.choice([56, 84, 112])  # 4, 6 or 8 merged vision tokens
    query, aux = Image.new("RGB", (width, 56), "white"), Image.new("RGB", (56, 56), "white")
    for c, n in counts.items():
        for _ in range(n):
            x, y = rng.randint(4, 48), rng.randint(4, 48)
            for img in ([query, aux] if c == color else [query]):
                ImageDraw.Draw(img).ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[c])
    query.save(os.path.join(img_dir, f"q{i}.png"))
    aux.save(os.path.join(img_dir, f"a{i}.png"))
    n = counts[color]
    response = (f"<think>{f'I need to count the {color} circles. ' * rng.randint(1, 3)}<latent> <parser>only the {color} circles are "
                f"kept: there are {n}.</parser> So the count is {n}.</think><answer>{n}</answer>")
    return dict(id=f"s{i}", image=f"img/q{i}.png", question=f"How many {color} circles are there?",
                response=response, aux_image=f"img/a{i}.png", answer=str(n))


def write_sample_data(out_dir, n, seed=0):
    """Write out_dir/train.jsonl (+ img/) with n examples; returns the JSONL path."""
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    rng = random.Random(seed)
    rows = [sample_example(rng, i, os.path.join(out_dir, "img")) for i in range(n)]
    path = os.path.join(out_dir, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def corpus_texts():
    """Text the tokenizer is trained on: the chat scaffolding plus the sample task's words."""
    words = [f"How many {c} circles are there? only the {c} circles are kept: there are {n}. So the count is "
             f"{n}. I need to count the {c} circles." for c in COLORS for n in range(10)]
    return words + ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "<think></think><answer>"
                    "</answer><parser></parser><latent> yes no A B C D the answer is 0123456789 .,:;!?()"]


def build_tokenizer(texts, vocab_size=600):
    """A byte-level BPE tokenizer with Qwen's special tokens, trained offline on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:])


def tiny_config(tokenizer, hidden=64, layers=2, text=None, vision=None, attn=None):
    """Qwen2.5-VL config with the real architecture (M-RoPE, window attention, 2x2 patch merger), at toy size
    unless `text` / `vision` override fields of the text and vision configs (shape_config builds the
    benchmarks' small and Qwen2.5-VL-7B shapes this way); `attn` is the attention implementation (None: transformers' default).
    vocab_size leaves room above the tokenizer, as Qwen2.5-VL-7B's does."""
    from transformers import Qwen2_5_VLConfig
    ids = tokenizer.convert_tokens_to_ids
    special = dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vocab = (len(tokenizer) + 63) // 64 * 64 + 64
    text = {**dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   tie_word_embeddings=False, **special), **(text or {})}
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary half-dim, split over (t, h, w)
    section = [16, 24, 24] if half == 64 else [half - 2 * (half // 3), half // 3, half // 3]  # 64: Qwen's own
    text.setdefault("rope_scaling", {"type": "mrope", "mrope_section": section})
    vision = {**dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                     fullatt_block_indexes=[1]), **(vision or {})}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
                            attn_implementation=attn, **special)


# named shapes for the benchmarks: shape -> (text, vision, image tokens range, median response tokens)
SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=768),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]), (4, 128), 48),
    "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=4096),
              dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[3]),
              (16, 256), 96),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31]),
           (64, 1024), 384),
}


@dataclasses.dataclass
class BenchFlags:
    """What every benchmark takes (bench_train.py, bench_infer.py): the random model's shapes, the seed, the output"""
    layers: int = dataclasses.field(default=0, metadata={"help": "decoder layers (0: the shape's own; 7b: 28; sample: tiny's 2)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "weights, length mix and sampling"})
    out: str = dataclasses.field(default="", metadata={"help": "also write the results here as JSON"})
    shapes: str = dataclasses.field(default="tiny", metadata={"help": "model shapes", "choices": ["tiny", "small", "7b"]})
    vision_depth: int = dataclasses.field(default=0, metadata={"help": "vision blocks (0: the shape's own; 7b: 32)"})
    latent_tokens: int = dataclasses.field(default=36, metadata={"help": "K latent slots per example"})


def shape_config(shapes, tokenizer, attn=None, layers=0, vision_depth=0):
    """The Qwen2.5-VL config of a named shape (tiny_config with SHAPES' overrides), with `layers` decoder layers and
    `vision_depth` vision blocks (0: the shape's own); the full-attention vision blocks that exist at that depth."""
    text, vision, _, _ = SHAPES[shapes]
    depth = vision_depth or vision["depth"]
    text = dict(text, num_hidden_layers=layers or text["num_hidden_layers"], rope_theta=1e6,
                max_position_embeddings=32768)
    vision = dict(vision, depth=depth, window_size=112,
                  fullatt_block_indexes=[i for i in vision["fullatt_block_indexes"] if i < depth])
    return tiny_config(tokenizer, text=text, vision=vision, attn=attn)


def build_tiny(out_dir, hidden=64, layers=2, vocab=600, seed=0, texts=None):
    """Write a random tiny Qwen2.5-VL model directory (safetensors + config + tokenizer + image processor)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts or corpus_texts(), vocab)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, hidden, layers))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # small images: 56x56 px is a 4x4 patch grid, i.e. 2x2 = 4 merged vision tokens
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    from common import parse_config
    cfg = parse_config(TinyConfig)
    print(f"tiny model -> {build_tiny(cfg.out, cfg.hidden, cfg.layers, cfg.vocab, cfg.seed)}")
    if cfg.sample_data:
        print(f"sample data -> {write_sample_data(cfg.sample_data, cfg.n_examples, cfg.seed)}")
