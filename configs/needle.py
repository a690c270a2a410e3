"""The selector learning from scratch on the generated needle benchmark, on a CPU.

  python -m train --config=configs/needle.py:stage=1
  python -m train --config=configs/needle.py:stage=2      # LoRA, from stage 1's checkpoint
  python -m train --config=configs/needle.py:stage=1,head=query_mlp   # the paper's head
  python -m train \
    --config=configs/needle.py:stage=1,other_question_weight=1,label_smoothing=0,listwise_weight=0
      # the paper's plain BCE

What it trains, and why. No pretrained weights exist on this machine, so stage 1 trains what
a pretrained backbone would otherwise bring: the whole model (the tiny SigLIP tower and the
tiny LLM as well as the projector, score query and score head), on importance prediction
alone (the needle benchmark has no instruction data to align with). Stage 2 is the paper's:
the backbone that stage 1 trained is frozen, LoRA adapters are added to the LLM, and the
adapters, projector, score query and score head train on importance prediction; the frozen
tower's pooled tokens are cached. The tokenizer is the built-in word tokenizer (whole words
as tokens, what a pretrained tokenizer gives), and the score head is `token_query` (each
of a frame's 9 token states matched against the question's query, the frame's match its best
token's, plus a term on the frame alone): the paper's `query_mlp` head stays at chance when
trained from scratch here (benchmarks/results_learning.md measures both).

The loss is the paper's BCE with three changes (train.step.ImportanceLoss), each because a
measurement asked for it (benchmarks/results_learning.md):
  - other_question_weight=10: a candidate that another question about the same video asks
    for (the card of another needle) counts ten times as a negative. The BCE alone is
    content once such a card scores below the asked one, so a question's picks landed on
    the video's other needles too;
  - label_smoothing=0.3: targets labels (1 - e) + e / 2, so every negative settles at one
    finite logit, and the other needles' cards (weighted ten times) settle below the
    background, instead of the background sinking furthest;
  - listwise_weight=0.3: a ListNet term (the softmax of each record's logits against its
    normalised labels), which is about the ranking that selection reads: the asked card
    came first for 55% of the questions without it, for all but one with it. At weight 1
    its push on the negatives outweighed the smoothing's floor, and the other needles'
    cards stayed above the background.

The videos are real mp4 files (frameselect_jax/synthetic.py) decoded through
frameselect_jax/video.py: 256 training and 64 held-out videos, 16 s at 8 fps, three needles
(cards of a named colour, shown 0.5 s: one of the 32 candidates) and two distractor cards
each, one question per needle.
"""

from configs import common

EVERYTHING = ("vision_tower", "projector", "llm", "score_query", "score_head")
HEADS = ("projector", "score_query", "score_head")


def get_config(arg=None):
  args = common.parse_arg(
    arg,
    stage=1,
    head="token_query",
    other_question_weight=10.0,
    listwise_weight=0.3,
    label_smoothing=0.3,
  )
  c = common.base(stage=args.stage, tiny=True, name=f"needle-stage{args.stage}")
  c.model.num_candidates = 32
  c.model.score_head = args.head
  c.model.dtype = "float32"  # CPU: bfloat16 is emulated, slower than float32
  c.model.frozen_dtype = "float32"
  c.data.source = "needle"
  c.data.needle = common.needle_settings()
  c.data.tokenizer = "words"
  c.data.global_batch_size = 8 if args.stage == 1 else 16
  c.data.max_question_length = 48
  c.data.max_instruction_length = 64
  c.train.task_ratio = "0:1"
  c.train.schedule = "cosine"
  c.train.other_question_weight = args.other_question_weight
  c.train.listwise_weight = args.listwise_weight
  c.train.label_smoothing = args.label_smoothing
  c.train.warmup_fraction = 0.05
  if args.stage == 1:
    c.train.trainable = EVERYTHING
    c.data.cache_visual_tokens = False  # the tower trains
    c.train.lr = 7e-4
    c.train.num_steps = 1200
  else:
    c.train.trainable = HEADS
    c.train.lr = 2e-4
    c.train.num_steps = 400
    c.train.init_from = "workdirs/needle-stage1/checkpoints"
  c.validation.ks = (2, 4, 8)
  c.validation.every_steps = 200
  c.checkpoint.every_steps = 400
  return c
