"""Text: the CLIP tokenizer, chunked encoding and embedding names (tokens.py), and A1111's
prompt syntax (prompt_syntax.py)."""
