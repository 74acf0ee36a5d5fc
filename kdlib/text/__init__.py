"""Text before it is a tensor: reading, augmenting, tokenizing, masking, packing, padding, aligning.

Here: corpus readers (readers/, one module per format), augmentation (augment/), the one tokenizer call
for rows (tokenize), BERT masking (masking), document packing (packing), right-padding (padding), and the
character-span alignment of two tokenizations (alignment). A new corpus format is a module in readers/.
Not here: labelled task sets (kdlib.tasks) and the transfer-set cache (kdlib.cache).
"""
