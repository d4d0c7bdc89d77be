"""OpenAI-compatible HTTP server (`openk2 serve`): `create_app` builds the FastAPI app, `serve` runs it
with uvicorn. Needs the `server` extra; `import openk2` does not import this package."""

from pathlib import Path

from openk2.server.app import create_app

__all__ = ["create_app", "serve"]


def serve(model, tokenizer, path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          quantize: str | None = None) -> None:
    """Serve `model` under the name of its folder. Without a K2 tokenizer in the folder, text is
    byte-level (ids 0..255 are bytes, 256.. K2's special tokens), which needs 512 embedding rows."""
    import uvicorn

    from openk2.tokenizer import Tokenizer, load_chat_template
    from openk2.tokenizer.chat import template_variables

    if quantize:
        from openk2.quant import quantize_model
        quantize_model(model, quantize)
    if tokenizer is None:
        if model.cfg.vocab_size < 512:
            raise ValueError(f"no tokenizer in {path} and vocab_size {model.cfg.vocab_size} < 512 (byte-level)")
        tokenizer = Tokenizer({bytes([b]): b for b in range(256)})
    folder = Path(path)
    template = load_chat_template(folder) if folder.is_dir() else None
    app = create_app(model, tokenizer, folder.name if folder.is_dir() else path, api_key=api_key,
                     chat_template=template, template_vars=template_variables(folder) if template else None)
    uvicorn.run(app, host=host, port=port)
