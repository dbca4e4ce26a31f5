"""The examples and notes that ``kvmerge COMMAND --help`` prints under each command."""

EPILOG_METHODS = """examples:
  kvmerge methods
"""
EPILOG_GENERATE = """examples:
  kvmerge generate --method h2o+cam --budget 48 "Write a haiku about the sea."
  kvmerge generate --method streaming --budget 64 --max-new-tokens 128 "Tell me a story."
  kvmerge generate --method full --raw "The capital of France is"

A float budget is a fraction of the prompt (chat template included); an int is entries per KV head.
"""
EPILOG_ASK = """examples:
  kvmerge ask --context report.txt --method h2o+cam --budget 0.2 --question "Who wrote it?" --question "When?"
  kvmerge ask --context book.txt --method snapkv --budget 512 --question "Summarise chapter 1." --json

The context is compressed once (a float budget is a fraction of it); the questions are answered, whole
and as one left-padded batch (--batch-size splits it), from copies of the compressed cache.
"""
EPILOG_PPL = """examples:
  kvmerge ppl --method h2o+cam --budget 0.2
  kvmerge ppl --method streaming+cam --budget 0.2 --data pg-essays --tokens 1024 --chunk 1 --json
  kvmerge ppl --method tova --budget 256 --data my_book.txt --tokens 4096 --chunk 16

The first --tokens tokens of the text go through one bounded cache in steps of --chunk tokens
(1 = token by token, the StreamingLLM/CaM protocol) and every next token is scored.
A float budget is a fraction of --tokens (0.2 = the papers' "20% KV cache").
"""
EPILOG_TRAIN_LESS = """examples:
  kvmerge train-less --method h2o --budget 51
  kvmerge train-less --method streaming --budget 0.1 --sequences 64 --out runs/less-streaming-10

Trains LESS's kernels (the official architecture: per head, hidden 512, rank 8) for one selector and
budget, layer by layer with the model frozen, on text no evaluation reads (the essays after their
first fifth + the third quarter of Wikitext-2 test). The default directory is where make_cache(model,
"h2o+less", 51) looks for them; an interrupted run continues from its last finished layer when run
again. Writes the loss curve (loss.png) beside the kernels.
"""
EPILOG_CALIBRATE = """examples:
  kvmerge calibrate-kvmerger --target 0.5
  kvmerge calibrate-kvmerger --target 0.35 --tokens 1024 --model path/to/model

Bisects the cosine-similarity threshold at which KVMerger's merging alone keeps --target of the
entries of a held-out text; pass it as similarity= (make_cache(model, "snapkv+kvmerger", 0.5,
schedule="prefill", similarity=T)).
"""
EPILOG_DEMO = """examples:
  kvmerge demo
  kvmerge demo --tokens 400 --budget 0.1 --out runs/demo-small

Runs full, streaming, streaming+cam, h2o, h2o+cam, tova, scissorhands, corm (adaptive size),
knorm and random (baselines) token by token on the first --tokens
tokens of the Paul Graham essays and writes <out>/results.json and <out>/ppl_memory.png.
"""


EPILOG_MAIN = """examples:
  kvmerge methods                                             # every method string, with its options
  kvmerge generate --method h2o+cam --budget 48 "Write a haiku about the sea."
  kvmerge ask --context doc.txt --method h2o+cam --budget 0.2 --question "Who?" --question "When?"
  kvmerge ppl --method streaming+cam --budget 0.2 --tokens 512
  kvmerge demo                                                # perplexity and KV memory of 10 methods
  kvmerge eval qa --methods full,h2o,h2o+cam --budgets 0.2 --limit 40
  kvmerge bench --contexts 512,2048 --batches 1

Data: $KVMERGE_DATA (else ../shared/data beside the checkout); converted models: $KVMERGE_CACHE
(else ~/.cache/kvmerge). Run 'kvmerge COMMAND --help' for each command's options and examples.
"""
