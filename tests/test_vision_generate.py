"""MoE-LLaVA generation: cached decoding after a spliced image + text prefill, the CLI's
``generate --image`` and the server's image content parts, each against a slow obvious reference."""

from __future__ import annotations

import pytest
import torch

from moekit.models.vision.config import ViTConfig

IMG = 39


def tiny_vlm(moe: bool = False):
    from moekit.models import ModelConfig
    from moekit.models.vision.llava import MoELLaVA, VLMConfig

    vision = ViTConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, image_size=8, patch_size=4, num_channels=3
    )
    text = ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=24, moe=None)
    vlm = MoELLaVA(VLMConfig(vision=vision, text=text, image_token_id=IMG))
    if moe:
        from moekit.surgery.llava import moe_llava_layers, upcycle_vlm

        vlm = upcycle_vlm(vlm, moe_llava_layers(2))
        # Upcycled experts are copies; perturb them so routing matters.
        with torch.no_grad():
            for n, p in vlm.named_parameters():
                if ".mlp." in n:
                    p.add_(0.3 * torch.randn_like(p))
    return vlm


def recompute_greedy(vlm, ids, px, mask, num_new):
    """The obvious loop: the LM over the whole spliced sequence, argmax, append, repeat."""
    lm = vlm.language_model
    embeds = vlm.spliced_embeds(ids, px)
    mask = torch.ones_like(ids) if mask is None else mask
    out = ids
    with torch.no_grad():
        for _ in range(num_new):
            logits = lm(out, attention_mask=mask, inputs_embeds=embeds).logits[:, -1]
            nxt = logits.argmax(-1)
            out = torch.cat([out, nxt[:, None]], 1)
            embeds = torch.cat([embeds, lm.embed_tokens(nxt[:, None])], 1)
            mask = torch.cat([mask, mask.new_ones(len(nxt), 1)], 1)
    return out


@pytest.mark.parametrize("moe", [False, True])
def test_vlm_generate_matches_recompute_with_0_1_images_and_left_padding(moe, monkeypatch):
    from moekit.models import decode

    torch.manual_seed(0)
    vlm = tiny_vlm(moe).double().eval()
    p = vlm.config.image_seq_length
    px = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sessions = []
    real_init = decode.DecodeSession.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        sessions.append(self)

    monkeypatch.setattr(decode.DecodeSession, "__init__", spy)
    # 0 images, 1 image, then 2 rows (one image each) with left padding.
    cases = [
        (torch.tensor([[3, 4, 5]]), None, None),
        (torch.tensor([[3] + [IMG] * p + [4, 5]]), px[:1], None),
        (
            torch.tensor([[0, 0, 3] + [IMG] * p + [6], [7] + [IMG] * p + [8, 9, 10]]),
            px,
            torch.tensor([[0, 0, 1] + [1] * p + [1], [1] * (p + 4)]),
        ),
    ]
    for ids, images, mask in cases:
        want = recompute_greedy(vlm, ids, images, mask, 6)
        got = vlm.generate(ids, pixel_values=images, attention_mask=mask, max_new_tokens=6)
        assert torch.equal(got, want)
        assert sessions[-1].fast  # the LM's fast decode path ran after the spliced prefill
        nocache = vlm.generate(
            ids, pixel_values=images, attention_mask=mask, max_new_tokens=6, use_cache=False
        )
        assert torch.equal(nocache, want)
    # The padded row decodes as it does alone.
    ids, images, mask = cases[2]
    alone = vlm.generate(ids[:1, 2:], pixel_values=px[:1], max_new_tokens=6)
    assert torch.equal(
        vlm.generate(ids, pixel_values=images, attention_mask=mask, max_new_tokens=6)[0, 2:], alone[0]
    )


def test_vlm_generate_general_path_and_sampling_are_the_lm_ones():
    torch.manual_seed(1)
    vlm = tiny_vlm().eval()
    p = vlm.config.image_seq_length
    ids = torch.tensor([[3] + [IMG] * p + [4]])
    px = torch.randn(1, 3, 8, 8)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a = vlm.generate(ids, pixel_values=px, max_new_tokens=5, do_sample=True, temperature=0.8, generator=g1)
    b = vlm.generate(ids, pixel_values=px, max_new_tokens=5, do_sample=True, temperature=0.8, generator=g2)
    assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + 5)
    with pytest.raises(ValueError, match="placeholder"):
        vlm.generate(ids, pixel_values=None, max_new_tokens=2)


# --- moekit generate --image ---------------------------------------------------------------------

CHAT_TEXT = "what colour is the square? red. how many circles? two. " * 20


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny random VLM folder with a byte-level tokenizer; the placeholder is one id past it."""
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import ModelConfig
    from moekit.models.io import write_model_folder
    from moekit.models.vision.llava import MoELLaVA, VLMConfig

    tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    n = tok.get_vocab_size()
    vision = ViTConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, image_size=8, patch_size=4, num_channels=3
    )
    text = ModelConfig(
        vocab_size=n + 1, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=24, moe=None
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vlm") / "vlm"
    write_model_folder(MoELLaVA(VLMConfig(vision=vision, text=text, image_token_id=n)), folder)
    save_tokenizer(tok, folder)
    return folder


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_cli_generate_with_an_image_streams_what_generate_gives(vlm_folder, tmp_path, capsys):
    pytest.importorskip("PIL")
    import numpy as np

    import moekit
    from moekit.cli.main import main
    from moekit.data.images import preprocess_images, read_image
    from moekit.loader import load_tokenizer
    from moekit.models.vision.llava import image_preprocess, image_prompt_ids

    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    png = _png(tmp_path / "img.png", rgb)
    argv = ["generate", "--model", str(vlm_folder), "--image", str(png), "--prompt", "what colour? <image>"]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    # The direct route: read, preprocess (resize 12x10 -> 8x8), splice, generate.
    vlm = moekit.from_pretrained(vlm_folder)
    tok = load_tokenizer(vlm_folder)
    assert np.array_equal(read_image(png), rgb.astype(np.float32) / 255)
    px = preprocess_images(read_image(png)[None], image_preprocess(vlm.config))
    ids = image_prompt_ids(lambda t: tok.encode(t).ids, "what colour? <image>", 1, vlm.config)
    assert ids.count(vlm.config.image_token_id) == vlm.config.image_seq_length
    new = vlm.generate(torch.tensor([ids]), pixel_values=px, max_new_tokens=8, eos_token_id=0)[0, len(ids) :]
    new = [t for t in new.tolist() if t != 0]
    # The stream holds back a trailing partial character (random tokens split UTF-8 sequences).
    shown = next(
        t for t in (tok.decode(new[:k]) for k in range(len(new), -1, -1)) if not t.endswith("\ufffd")
    )
    assert len(new) == 8 and out == "what colour? <image>" + shown + "\n"
    # A .npy (float [0, 1]) of the same pixels gives the same answer.
    np.save(tmp_path / "img.npy", rgb.astype(np.float32) / 255)
    argv[4] = str(tmp_path / "img.npy")
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == out


def test_cli_generate_image_errors_are_one_line(vlm_folder, tmp_path, capsys):
    pytest.importorskip("PIL")
    import numpy as np

    from moekit.cli.main import main
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    text_folder = tmp_path / "text"
    MoEForCausalLM(moe_tiny()).save_pretrained(text_folder)
    save_tokenizer(train_tokenizer([CHAT_TEXT], vocab_size=300), text_folder)
    png = _png(tmp_path / "ok.png", np.zeros((8, 8, 3), dtype=np.uint8))
    rgba = _png(tmp_path / "rgba.png", np.zeros((8, 8, 4), dtype=np.uint8))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    cases = [
        (text_folder, png, "text-only model"),
        (vlm_folder, junk, "not a readable"),
        (vlm_folder, tmp_path / "missing.png", "does not exist"),
        (vlm_folder, rgba, "4 channel"),
    ]
    for folder, image, message in cases:
        code = main(["generate", "--model", str(folder), "--image", str(image), "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# --- moekit serve: image content parts -----------------------------------------------------------


def _data_url(array) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(folder, prefill_chunk=None):
    from fastapi.testclient import TestClient

    from moekit.infer.server import ServerConfig, create_app
    from moekit.loader import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(folder)
    config = ServerConfig(model_name="m", max_tokens_limit=16, prefill_chunk=prefill_chunk)
    app = create_app(loaded.model, loaded.tokenizer, config)
    return TestClient(app), loaded


@pytest.mark.parametrize("prefill_chunk", [None, 3], ids=["one-go", "chunked"])
def test_serve_image_parts_reply_equals_direct_generate(vlm_folder, prefill_chunk):
    """The reply equals MoELLaVA.generate; with chunked prefill the spliced image embeddings are
    read 3 positions at a time."""
    pytest.importorskip("fastapi")
    pytest.importorskip("PIL")
    import numpy as np

    from moekit.data.images import preprocess_images, read_image
    from moekit.infer.server import DEFAULT_CHAT_TEMPLATE, render_chat
    from moekit.models.vision.llava import image_preprocess, image_prompt_ids

    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    url = _data_url(rgb)
    parts = [
        {"type": "text", "text": "look: "},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": " what colour is the square?"},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0}
    client, loaded = _client(vlm_folder, prefill_chunk)
    with client:
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        got = reply.json()["choices"][0]["message"]["content"]
        # The same pixels and prompt, straight through MoELLaVA.generate.
        vlm, tok = loaded.model, loaded.tokenizer
        prompt = render_chat(
            DEFAULT_CHAT_TEMPLATE,
            [{"role": "user", "content": "look: <image> what colour is the square?"}],
            "<|endoftext|>",
        )
        ids = image_prompt_ids(lambda t: tok.encode(t).ids, prompt, 1, vlm.config)
        px = preprocess_images(read_image(_png_bytes(rgb))[None], image_preprocess(vlm.config))
        out = vlm.generate(
            torch.tensor([ids]), pixel_values=px, max_new_tokens=6, eos_token_id=loaded.eos_token_id
        )
        new = [t for t in out[0, len(ids) :].tolist() if t != loaded.eos_token_id]
        assert len(new) == 6 and got == tok.decode(new) and reply.json()["usage"]["prompt_tokens"] == len(ids)
        batch = client.get("/health").json()["batch"]
        assert batch["prefill_chunk"] == prefill_chunk
        assert batch["prefill_chunks"] == (1 if prefill_chunk is None else -(-len(ids) // prefill_chunk))
        # Streaming gives the same text; a text-only message to the VLM works too.
        streamed = client.post("/v1/chat/completions", json=body | {"stream": True})
        chunks = [
            line[6:]
            for line in streamed.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        import json

        text = "".join(json.loads(c)["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == got
        plain = body | {"messages": [{"role": "user", "content": "hello"}]}
        assert client.post("/v1/chat/completions", json=plain).status_code == 200
        # Refusals: a non-data URL (no network), a broken payload, an unreadable image.
        for bad_url, message in (
            ("https://example.com/cat.png", "not a data: URL"),
            ("data:image/png;base64,@@@", "base64"),
            ("data:image/png;base64,aGVsbG8=", "not a readable"),
        ):
            bad = [{"type": "image_url", "image_url": {"url": bad_url}}]
            r = client.post(
                "/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": bad}]}
            )
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def _png_bytes(array) -> bytes:
    import base64

    return base64.b64decode(_data_url(array).split(",", 1)[1])


def test_serve_refuses_image_parts_for_a_text_only_model(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("PIL")
    import numpy as np

    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    MoEForCausalLM(moe_tiny()).save_pretrained(tmp_path / "text")
    save_tokenizer(train_tokenizer([CHAT_TEXT], vocab_size=300), tmp_path / "text")
    client, _ = _client(tmp_path / "text")
    parts = [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": _data_url(np.zeros((8, 8, 3), np.uint8))}},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    with client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "'m' is text-only" in r.json()["error"]["message"], r.text
