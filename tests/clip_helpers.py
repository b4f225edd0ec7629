"""A tiny random CLIP model saved to a folder the way transformers saves one, for the monitor's CLIP scores."""

from pathlib import Path


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """config.json, weights, preprocessor_config.json (32 px pictures) and the shipped tokenizer; no download."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dreambooth_ext.tokenizer_files import write_tokenizer

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = Path(folder)
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    write_tokenizer(folder)
    return folder
