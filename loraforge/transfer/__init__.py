"""Trans-LoRA (Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning",
arXiv 2405.17258, NeurIPS 2024): move an adapter to another base model without its training data.

    source time, with the real data D        transfer time, with nothing but the kit
    ---------------------------------        ----------------------------------------------------------
    seeds S = a few rows of D                 candidates x~ <- target base, prompted with S   (synth.py)
    synthetic x' <- source base, from S       keep x~ with p_real(x~) >= P                    (discriminator.py)
    discriminator: LoRA + head on the         labels y~ = greedy(source + adapter, x~)        (pipeline.py)
      source, real (D) vs synthetic (x')      target adapter <- the normal trainer on {(x~, y~)}
    KIT = S + discriminator + source adapter  (kit.py)

Only text passes between the models, so source and target may have different tokenizers and families.
"""
