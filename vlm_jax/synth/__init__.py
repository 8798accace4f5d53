"""Synth²: synthetic image–text pairs in embedding space (METHODS.md §6).

captions     the caption LM's data, balanced concept prompts, sampling, diversity statistics
embeddings   captions -> VQ code grids with the text-to-codes generator (and, for inspection
             and cost, to pixels and back)
jobs         the `synth` job: tokenizer, caption LM, generator, resumable pairs, the VLM

The models (the VQ tokenizer, the MaskGIT generator, the code-reading VLM) live in
vlm_jax/models/ (vq.py, maskgit.py, text_to_codes.py, vlm.py's vision_input="vq").
"""
