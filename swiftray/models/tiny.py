"""Build a tiny Qwen3-style model and tokenizer offline, for tests and demos.

No model hub is reachable, so every test builds its model here: a randomly
initialised `Qwen3ForCausalLM` (or, with `moe=True`, a `Qwen3MoeForCausalLM`
like Qwen3-30B-A3B: routed experts, top-k, untied head) and a byte-level BPE
tokenizer trained on a small built-in text. The output is an ordinary Hugging Face folder that
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
(and vLLM) load like a real checkpoint.

Same arguments give byte-identical files: the weights depend only on the
seed, the tokenizer only on the corpus (BPE training has no randomness).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from swiftray.models.chat_template import QWEN3_CHAT_TEMPLATE

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, EOS_TOKEN]
# Qwen3 keeps these as ordinary added tokens (special=False): they survive decode(skip_special_tokens=True).
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen's pre-tokenizer regex: letters in runs (with one leading space or symbol), every digit alone,
# punctuation runs, newlines kept apart from other whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ENGLISH = """\
Hello! How can I help you today? I am a helpful assistant. Please answer the question step by step.
Let me think about this problem carefully before I give the final answer. The answer is correct.
Thank you very much for your kind words. You are welcome, and I am happy to help with anything else.
Could you explain what this means? Sure, here is a short explanation with a simple example for you.
A language model reads a sequence of tokens and predicts the next token. Training makes it better.
Reinforcement learning rewards good answers and punishes bad ones, so the policy slowly improves.
The reward function compares the completion with the solution and returns a number between zero and one.
Mathematics is the study of numbers, shapes, patterns, quantities, structure, space and change.
To add two numbers, write them one above the other and add each column from right to left.
When the sum of a column is ten or more, carry one to the next column on the left side.
Subtraction takes one number away from another; multiplication is repeated addition of equal groups.
Division splits a quantity into equal parts. The remainder is what is left over after dividing.
A fraction has a numerator and a denominator. Half of eight is four, and a quarter of twelve is three.
Please solve the following problem and put your final answer within a box at the end of your reply.
First, we calculate the total cost. Then we subtract the discount. Finally, we check our work again.
Tom has five apples and buys seven more apples at the market. How many apples does Tom have now?
Mary reads twelve pages every day. After one week, how many pages has she read in total this month?
The train leaves the station at nine in the morning and arrives at noon, three hours later than planned.
Water boils at one hundred degrees. Ice melts when the temperature rises above zero degrees Celsius.
The sun rises in the east and sets in the west. The moon moves around the earth about once a month.
Plants need light, water and air to grow. Animals eat plants or other animals to get their energy.
Our computer program reads the input file, parses every line, and writes the result to the output.
Python is a popular programming language. Functions take arguments and return values to the caller.
The server received your request and sent back a response with a status code and a short message.
Write a function that returns the largest value in a list, or none when the list is empty.
Tools let the assistant search the web, read documents, run code, or call an external service.
The weather today is sunny and warm, but tomorrow it will be cloudy with a chance of heavy rain.
My favourite colours are red, green, blue, yellow, orange, purple, black, white, brown and grey.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
She quickly opened the old wooden door, walked into the quiet garden and looked at the bright flowers.
Good morning, good afternoon, good evening, good night. See you later, and have a wonderful day!
I'm sure you're right, but it's late and we've got work to do, so they'll wait until we'd finished.
The user asks a question; the system describes the rules; the assistant writes a clear, short reply.
Summarize the following article in three sentences, keeping the most important facts and names.
Translate this sentence into Chinese, then translate it back into English and compare both versions.
Is this statement true or false? Give a reason for your choice and explain your thinking briefly.
An important idea in science is that experiments must be repeated to confirm their results carefully.
History teaches us about people, cities, wars, kings, empires, inventions and the lives of families.
Music, painting, dance, poetry and film are different kinds of art that people enjoy all around the world.
The doctor told the patient to drink more water, sleep well, walk every day and eat fresh vegetables.
Children play football in the park after school while their parents talk on the wooden benches nearby.
Keep the answer brief. Do not repeat the question. Use plain words that a student can understand.
Engineers design bridges, engines, machines and networks; scientists measure, observe and publish papers.
The library opens at eight o'clock. Borrow two books, return them within fourteen days, and pay no fee.
Our small village sits between a river and a forest, where birds sing and foxes hide among the trees.
Cooking dinner: chop the onions, boil the potatoes, fry the chicken, season with salt, pepper and herbs.
Geometry studies triangles, circles, squares, rectangles, angles, areas, volumes and perimeters.
Probability measures how likely an event is; statistics summarizes data with averages and variance.
An equation states that two expressions are equal. Solve for the unknown variable by isolating it.
Prime numbers have exactly two divisors. Even numbers divide by two; odd numbers leave a remainder.
The company hired new employees, opened an office downtown, and launched a product for customers.
Doctors, nurses, teachers, farmers, pilots, lawyers, artists and students all work hard every week.
Please format the output as JSON with the keys name, arguments, result, error and timestamp.
The function call failed because the argument was missing; retry with a valid value and timeout.
Memory, storage, processor, keyboard, screen, battery, network, cloud, database, and software.
Happiness, kindness, honesty, patience, courage and curiosity are qualities that many people admire.
Yesterday we visited the museum, watched a movie, bought groceries, and cleaned the whole kitchen.
Checkpoint saved. Evaluation finished. Accuracy improved from sixty to seventy percent after training.
Gradient descent updates each parameter in the direction that lowers the loss on the current batch.
Attention layers mix information between positions; feedforward layers transform every position alone.
Without doubt, the journey across the mountains was difficult, dangerous, exciting and unforgettable.
Scientists discovered that frozen oceans beneath distant icy moons might contain microscopic life.
Vocabulary grows through reading novels, newspapers, magazines, letters, poems and encyclopedias.
Neighbours gathered around the fountain, celebrating the festival with lanterns, drums and fireworks.
"""

_CHINESE = """\
你好！我是一个人工智能助手，很高兴为你服务。请问有什么可以帮助你的吗？
谢谢你的问题。让我们一步一步地思考，然后给出最后的答案。
数学是研究数量、结构、变化以及空间等概念的一门学科。加法、减法、乘法和除法是基本运算。
今天天气很好，我们一起去公园散步吧。明天可能会下雨，记得带伞。
学习语言需要每天练习，多读多写多说，才能不断进步。
中国的首都是北京。长城和故宫都是非常有名的历史文化遗产。
机器学习模型通过大量数据进行训练，强化学习根据奖励来改进策略。
春天来了，花开了，小鸟在树上唱歌。夏天很热，秋天凉快，冬天下雪。
我喜欢读书、写字、画画、唱歌和跑步。周末我常常和朋友一起看电影。
这个问题的答案是正确的。请检查你的计算过程，并解释每一步的原因。
计算机程序由函数、变量、循环和条件语句组成，可以自动完成很多工作。
"""

_CHAT_WORDS = (
    "system user assistant tool think answer question reasoning response reply final <think> </think>"
)


def builtin_corpus() -> list[str]:
    """The fixed training text of the tiny tokenizer: English, chat words, Chinese and arithmetic."""
    lines = _ENGLISH.splitlines() + _CHINESE.splitlines() + [_CHAT_WORDS]
    # Arithmetic in several phrasings, generated by formula (no randomness), so that operators and the
    # words around numbers get their own merges.
    for a in range(0, 100, 7):
        for b in range(3, 60, 11):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is {a + b}.")
            lines.append(f"Compute {a} * {b} - {b}: {a} * {b} - {b} = {a * b - b}")
            lines.append(f"{a + b} - {b} = {a}, and {a * b} / {b} = {a}.")
    return lines


def train_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Qwen's pre-tokenization and chat tokens."""
    n_added = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    if vocab_size <= 256 + n_added:
        raise ValueError(f"vocab_size={vocab_size} is too small: the byte alphabet alone needs 256 ids")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Single-digit tokens: arithmetic is learnable only if 123 is always "1", "2", "3".
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_corpus() + list(corpus or []), trainer=trainer)
    # Added after training so that their ids come after the BPE vocabulary, as in Qwen.
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(ADDED_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_tiny_model(
    output_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 384,
    vocab_size: int = 2000,
    max_position_embeddings: int = 2048,
    corpus: list[str] | None = None,
    moe: bool = False,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 96,
) -> Path:
    """Write a randomly initialised tiny Qwen3 model and its tokenizer to `output_dir`; return the path.

    `vocab_size` is the size of the embedding matrix; the tokenizer gets as many tokens as its corpus
    allows up to that size (the built-in corpus reaches 2000), the rest are unused rows as in real Qwen.

    moe=True: a Qwen3-MoE model as Qwen3-30B-A3B is built: every layer's MLP is `num_experts` routed
    experts of width `moe_intermediate_size`, `num_experts_per_tok` of them per token with their
    probabilities renormalised (norm_topk_prob), and an output head of its own (untied).
    """
    if head_dim < 32:
        raise ValueError(f"head_dim={head_dim}: vLLM's CPU attention kernels need head_dim >= 32")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if moe and not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"num_experts_per_tok={num_experts_per_tok} must lie in 1..num_experts={num_experts}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(vocab_size, corpus)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    common = dict(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype=torch.float32,
    )
    if moe:
        config = Qwen3MoeConfig(**common, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                moe_intermediate_size=moe_intermediate_size, norm_topk_prob=True,
                                decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
        model_cls = Qwen3MoeForCausalLM
    else:
        # Tied, as Qwen3-0.6B: other code must cope with tied weights.
        config = Qwen3Config(**common, tie_word_embeddings=True)
        model_cls = Qwen3ForCausalLM
    config.architectures = [model_cls.__name__]
    # transformers 5 writes only `rope_parameters`; readers built on 4.x look for `rope_theta` and would
    # silently use Qwen3's default of 1e6 instead, so write the legacy key too.
    config.rope_theta = config.rope_parameters["rope_theta"]
    # The global RNG is the only source of randomness in the initialisation; restore it afterwards.
    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_cls(config)
    finally:
        torch.random.set_rng_state(rng_state)
    # Greedy by default (tests expect reproducible generate); stop on either end token, as Qwen3 does.
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(output_dir)
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(output_dir)
    _make_tokenizer_config_portable(output_dir / "tokenizer_config.json")
    return output_dir


def _make_tokenizer_config_portable(path: Path) -> None:
    """Name the class that every transformers version knows.

    transformers 5 writes `TokenizersBackend`, which 4.x (as pinned by some vLLM builds) cannot load;
    both load `PreTrainedTokenizerFast`.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
