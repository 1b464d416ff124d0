"""The one description of ``--model`` that every command shows (kept import-light: no torch, no transformers)."""

MODEL_HELP = ("a built-in name (smollm2-135m, qwen2.5-coder-0.5b, llama-3.1-8b, ...), a Hugging Face model directory, "
              "a .gguf file or a hub id in the local Hugging Face cache; `kvslim models` lists them")
