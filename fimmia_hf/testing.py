"""Offline tiny models and synthetic multimodal samples for tests, the demo and benchmarks.

Nothing here touches the network: every model is built in code from a config with random (seeded)
weights, and every tokenizer is *trained* in code on a small embedded Russian + English corpus with
the real tokenizer class of the model family, so the saved folders load back with the standard
``Auto*`` classes exactly like a Hub checkpoint would. The synthetic samples are MERA-style
multiple-choice prompts whose correct answer is really determined by the generated media.

Public API:
- :func:`build_tiny` (kinds in :data:`KINDS`, loading class names in :data:`AUTO_CLASSES`)
- :func:`make_synthetic_samples`
- :func:`synthetic_features`
"""

from __future__ import annotations

import json
import os
import re
import shutil
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "AUTO_CLASSES",
    "KINDS",
    "MARKER_FILE",
    "TARGET_KINDS",
    "build_infiller",
    "build_target",
    "build_tiny",
    "make_synthetic_samples",
    "synthetic_features",
    "train_tokenizer",
]

#: The kinds :func:`build_tiny` can make.
KINDS = ("image-text", "audio-text", "text-lm", "t5-infill", "text-encoder", "image-encoder", "audio-encoder")

#: Which ``transformers`` Auto class loads the model of each kind (the processor always loads with
#: ``AutoProcessor``; text kinds also with ``AutoTokenizer``).
AUTO_CLASSES = {
    "image-text": "AutoModelForImageTextToText",
    "audio-text": "AutoModelForMultimodalLM",  # also AutoModelForSeq2SeqLM; not ImageTextToText / CausalLM
    "text-lm": "AutoModelForCausalLM",
    "t5-infill": "AutoModelForSeq2SeqLM",
    "text-encoder": "AutoModel",
    "image-encoder": "AutoModel",
    "audio-encoder": "AutoModel",
}

#: Marker written last into a finished build folder; lets :func:`build_tiny` reuse it.
MARKER_FILE = "fimmia_tiny.json"
_MARKER_FORMAT = 1
_SIZES = ("tiny", "mini", "small")

# --------------------------------------------------------------------------------------------
# Synthetic content vocabulary (shared by the sample generator and the tokenizer corpus).
# --------------------------------------------------------------------------------------------

_COLOURS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    # key: (RGB, Russian masculine adjective, English)
    "red": ((220, 40, 40), "красный", "red"),
    "green": ((40, 170, 60), "зелёный", "green"),
    "blue": ((40, 80, 220), "синий", "blue"),
    "yellow": ((235, 210, 40), "жёлтый", "yellow"),
    "purple": ((150, 60, 190), "фиолетовый", "purple"),
    "orange": ((245, 140, 30), "оранжевый", "orange"),
}
_SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("круг", "circle"),
    "square": ("квадрат", "square"),
    "triangle": ("треугольник", "triangle"),
    "diamond": ("ромб", "diamond"),
}
_DIRECTIONS: dict[str, tuple[tuple[int, int], str, str]] = {
    "left": ((-1, 0), "влево", "left"),
    "right": ((1, 0), "вправо", "right"),
    "up": ((0, -1), "вверх", "up"),
    "down": ((0, 1), "вниз", "down"),
}
_BACKGROUNDS = ((200, 200, 200), (120, 120, 120), (60, 60, 60), (230, 225, 210))
# (Russian nominative, Russian genitive, English)
_NAMES = (("Маша", "Маши", "Masha"), ("Петя", "Пети", "Petya"), ("Оля", "Оли", "Olya"), ("Иван", "Ивана", "Ivan"),
          ("Анна", "Анны", "Anna"))
_OBJECTS = (("мяч", "ball"), ("шарф", "scarf"), ("зонт", "umbrella"), ("рюкзак", "backpack"))
# Who sent a task, from where (Russian genitive, English): the line that makes each prompt the sample's own.
_AUTHORS = (("Маша", "а", "Masha"), ("Петя", "", "Petya"), ("Оля", "а", "Olya"), ("Иван", "", "Ivan"),
            ("Анна", "а", "Anna"), ("Дима", "", "Dima"), ("Катя", "а", "Katya"), ("Юра", "", "Yura"),
            ("Лена", "а", "Lena"), ("Коля", "", "Kolya"), ("Света", "а", "Sveta"), ("Саша", "", "Sasha"))
_CITIES = (("Москвы", "Moscow"), ("Казани", "Kazan"), ("Томска", "Tomsk"), ("Перми", "Perm"), ("Самары", "Samara"),
           ("Омска", "Omsk"), ("Тулы", "Tula"), ("Твери", "Tver"), ("Курска", "Kursk"), ("Иркутска", "Irkutsk"))
_DAYS = (("в понедельник", "Monday"), ("во вторник", "Tuesday"), ("в среду", "Wednesday"), ("в четверг", "Thursday"),
         ("в пятницу", "Friday"), ("в субботу", "Saturday"), ("в воскресенье", "Sunday"))
_TIMES = (("утром", "morning"), ("днём", "afternoon"), ("вечером", "evening"), ("ночью", "night"))

_TEXT: dict[str, dict[str, str]] = {
    "ru": {
        "instr_image": "Внимательно посмотрите на изображение и ответьте на вопрос.",
        "instr_video": "Посмотрите видео и ответьте на вопрос.",
        "instr_audio": "Прослушайте аудиозапись и ответьте на вопрос.",
        "instr_text": "Прочитайте текст и ответьте на вопрос.",
        "choose": "Выберите один вариант ответа из A, B, C, D и напишите только букву.",
        "question": "Вопрос:",
        "answer": "ОТВЕТ:",
        "q_colour": "Какого цвета фигура на изображении?",
        "q_shape": "Какая фигура изображена?",
        "q_direction": "В какую сторону движется фигура?",
        "q_video_colour": "Какого цвета движущаяся фигура?",
        "q_beeps": "Сколько звуковых сигналов слышно в записи?",
        "t_colour": "У {name_gen} есть {colour} {obj}.",
        "q_t_colour": "Какого цвета {obj} у {name_gen}?",
        "t_sum": "{name} записывает число {a} и прибавляет к нему {b}.",
        "q_t_sum": "Какое число получилось у {name_gen}?",
        "year": "Задание подготовлено в {year} году.",
        "source": "Задание №{number} прислал{suffix} {name} из {city} {day} {time}.",
    },
    "en": {
        "instr_image": "Look at the image carefully and answer the question.",
        "instr_video": "Watch the video and answer the question.",
        "instr_audio": "Listen to the audio recording and answer the question.",
        "instr_text": "Read the text and answer the question.",
        "choose": "Choose one option from A, B, C, D and write only the letter.",
        "question": "Question:",
        "answer": "ANSWER:",
        "q_colour": "What colour is the shape in the image?",
        "q_shape": "Which shape is shown?",
        "q_direction": "In which direction does the shape move?",
        "q_video_colour": "What colour is the moving shape?",
        "q_beeps": "How many beeps can be heard in the recording?",
        "t_colour": "{name} has a {colour} {obj}.",
        "q_t_colour": "What colour is the {obj} of {name_gen}?",
        "t_sum": "{name} thought of the number {a} and added {b} to it.",
        "q_t_sum": "What number did {name_gen} get?",
        "year": "This task was prepared in {year}.",
        "source": "Task no. {number} was sent by {name} from {city} on {day} {time}.",
    },
}
_PLACEHOLDER = {"image": "<image>", "audio": "<audio>", "video": "<video>", "text": ""}
_LETTERS = "ABCD"

# A few dozen hand-written sentences so that general Russian and English text (not only the
# synthetic prompts) tokenizes sensibly; the rest of the corpus is the synthetic prompts.
_HANDWRITTEN = """
Прочитайте задание и выберите правильный ответ.
Ответьте на вопрос, используя только информацию из текста.
Выберите верное утверждение из списка.
Напишите ответ одной буквой без пояснений.
На картинке изображён кот, который сидит на окне.
На фотографии видно море, песок и несколько лодок.
В записи слышен шум дождя и далёкий гром.
Девочка держит в руках красный воздушный шар.
Мальчик бежит по дороге вместе с собакой.
Сколько людей изображено на фотографии?
Какое животное издаёт этот звук?
Что находится в левом верхнем углу изображения?
Какой предмет лежит на столе рядом с книгой?
Где происходит действие на видео?
Музыка звучит громко, а потом становится тише.
Зелёный треугольник находится справа от синего круга.
Жёлтый квадрат больше, чем фиолетовый ромб.
Оранжевый мяч лежит под деревом.
Один, два, три, четыре, пять, шесть, семь, восемь, девять, десять.
Сегодня понедельник, завтра вторник, послезавтра среда.
В году двенадцать месяцев: январь, февраль, март и другие.
Москва является столицей России.
Волга — самая длинная река в Европе.
Учёные изучают свойства воды и воздуха.
Модель должна ответить на вопрос о содержании изображения.
Правильный ответ: B.
Варианты ответа перечислены ниже.
Звук повторяется три раза с короткими паузами.
Громкий сигнал, тихий сигнал, долгий сигнал.
Фигура движется слева направо по экрану.
Read the task and choose the correct answer.
Answer the question using only the information in the text.
Choose the true statement from the list.
Write the answer as a single letter without explanation.
The picture shows a cat sitting on the window sill.
The photo shows the sea, sand and several boats.
The recording contains the sound of rain and distant thunder.
A girl is holding a red balloon.
A boy is running along the road with a dog.
How many people are in the photo?
Which animal makes this sound?
What is in the top left corner of the image?
Which object lies on the table next to the book?
Where does the action in the video take place?
The music is loud at first and then becomes quiet.
The green triangle is to the right of the blue circle.
The yellow square is larger than the purple diamond.
The orange ball lies under the tree.
One, two, three, four, five, six, seven, eight, nine, ten.
Today is Monday, tomorrow is Tuesday, then Wednesday.
There are twelve months in a year: January, February, March and others.
Moscow is the capital of Russia.
Scientists study the properties of water and air.
The model has to answer a question about the content of the image.
The correct answer is B.
The answer options are listed below.
The sound repeats three times with short pauses.
A loud beep, a quiet beep, a long beep.
The shape moves from left to right across the screen.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 50 100 2010 2015 2020 2024.
"""


# --------------------------------------------------------------------------------------------
# MERA-style prompt generation (pure, seeded) - used by make_synthetic_samples and the corpus.
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One generated sample before its media is rendered."""

    input: str
    answer: str
    media: dict[str, Any] = field(default_factory=dict)


def _options_block(rng: np.random.Generator, correct: str, pool: list[str]) -> tuple[str, str]:
    """Four options (the correct one + three distractors) in random order, and the correct letter."""
    distractors = [p for p in pool if p != correct]
    chosen = list(rng.choice(distractors, size=3, replace=False)) + [correct]
    order = rng.permutation(4)
    options = [chosen[i] for i in order]
    letter = _LETTERS[options.index(correct)]
    return "\n".join(f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options)), letter


def _source_line(lang: str, rng: np.random.Generator) -> str:
    """Who sent the task and from where: as in real benchmarks, every prompt has content of its own, not
    only a shared template and options (a model memorises a sample by what only that sample says)."""
    name, suffix, name_en = _AUTHORS[int(rng.integers(len(_AUTHORS)))]
    city, day, time = (options[int(rng.integers(len(options)))] for options in (_CITIES, _DAYS, _TIMES))
    number = int(rng.integers(1, 1000))
    if lang == "ru":
        return _TEXT[lang]["source"].format(number=number, suffix=suffix, name=name, city=city[0], day=day[0],
                                            time=time[0])
    return _TEXT[lang]["source"].format(number=number, name=name_en, city=city[1], day=day[1],
                                        time="at night" if time[1] == "night" else f"in the {time[1]}")


def _prompt(
    lang: str, instr_key: str, modality: str, question: str, options: str, rng: np.random.Generator, context: str = ""
) -> str:
    """Instruction, media placeholder, the sample's source line, optional context, question, options, answer marker."""
    t = _TEXT[lang]
    lines = [t[instr_key] + " " + t["choose"]]
    if _PLACEHOLDER[modality]:
        lines.append(_PLACEHOLDER[modality])
    lines.append(_source_line(lang, rng))
    if context:
        lines.append(context)
    lines += [f"{t['question']} {question}", options, t["answer"]]
    return "\n".join(lines)


def _lang_index(lang: str) -> int:
    return 0 if lang == "ru" else 1


def _make_item(modality: str, lang: str, rng: np.random.Generator) -> _Item:
    """Draw one sample: the media parameters and a prompt whose answer they determine."""
    t, li = _TEXT[lang], _lang_index(lang)
    colour_names = {k: v[1 + li] for k, v in _COLOURS.items()}
    if modality == "image":
        colour = str(rng.choice(list(_COLOURS)))
        shape = str(rng.choice(list(_SHAPES)))
        media = {"colour": colour, "shape": shape, "size": int(rng.integers(64, 113)),
                 "background": int(rng.integers(len(_BACKGROUNDS)))}
        if rng.random() < 0.5:
            opts, letter = _options_block(rng, colour_names[colour], list(colour_names.values()))
            question = t["q_colour"]
        else:
            names = {k: v[li] for k, v in _SHAPES.items()}
            opts, letter = _options_block(rng, names[shape], list(names.values()))
            question = t["q_shape"]
        return _Item(_prompt(lang, "instr_image", modality, question, opts, rng), letter, media)
    if modality == "video":
        colour = str(rng.choice(list(_COLOURS)))
        shape = str(rng.choice(list(_SHAPES)))
        direction = str(rng.choice(list(_DIRECTIONS)))
        media = {"colour": colour, "shape": shape, "direction": direction,
                 "background": int(rng.integers(len(_BACKGROUNDS)))}
        if rng.random() < 0.7:
            names = {k: v[1 + li] for k, v in _DIRECTIONS.items()}
            opts, letter = _options_block(rng, names[direction], list(names.values()))
            question = t["q_direction"]
        else:
            opts, letter = _options_block(rng, colour_names[colour], list(colour_names.values()))
            question = t["q_video_colour"]
        return _Item(_prompt(lang, "instr_video", modality, question, opts, rng), letter, media)
    if modality == "audio":
        beeps = int(rng.integers(1, 5))
        media = {"beeps": beeps, "freq": float(rng.uniform(440.0, 880.0)), "seconds": float(rng.uniform(1.0, 2.0))}
        opts, letter = _options_block(rng, str(beeps), ["1", "2", "3", "4", "5"])
        return _Item(_prompt(lang, "instr_audio", modality, t["q_beeps"], opts, rng), letter, media)
    if modality == "text":
        person = _NAMES[int(rng.integers(len(_NAMES)))]
        name, name_gen = (person[0], person[1]) if lang == "ru" else (person[2], person[2])
        if rng.random() < 0.5:
            obj = _OBJECTS[int(rng.integers(len(_OBJECTS)))][li]
            colour = str(rng.choice(list(_COLOURS)))
            context = t["t_colour"].format(name_gen=name_gen, name=name, colour=colour_names[colour], obj=obj)
            opts, letter = _options_block(rng, colour_names[colour], list(colour_names.values()))
            question = t["q_t_colour"].format(obj=obj, name_gen=name_gen)
        else:
            a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
            context = t["t_sum"].format(name=name, a=a, b=b)
            pool = [str(a + b + d) for d in (-10, -2, -1, 1, 2, 10) if a + b + d > 0] + [str(a + b)]
            opts, letter = _options_block(rng, str(a + b), pool)
            question = t["q_t_sum"].format(name_gen=name_gen)
        return _Item(_prompt(lang, "instr_text", modality, question, opts, rng, context), letter, {})
    raise ValueError(f"unknown modality {modality!r}; expected one of image, audio, video, text")


def _corpus() -> list[str]:
    """The deterministic training corpus of the tokenizers: hand-written lines + synthetic prompts."""
    lines = [s for s in _HANDWRITTEN.strip().splitlines() if s.strip()]
    rng = np.random.default_rng(12345)
    for lang in ("ru", "en"):
        for modality in ("image", "video", "audio", "text"):
            for _ in range(40):
                item = _make_item(modality, lang, rng)
                lines.append(item.input + " " + item.answer)
        lines.append(_TEXT[lang]["year"].format(year=int(rng.integers(2000, 2030))))
    return lines


# --------------------------------------------------------------------------------------------
# Tokenizers: train the real class's own pipeline on the corpus.
# --------------------------------------------------------------------------------------------

_QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>",
]

# The real Qwen2.5-VL ChatML template, extended with the Qwen2-Audio audio item so that one template
# serves every Qwen kind (images/videos as Qwen2.5-VL places them, audio as Qwen2-Audio does).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class _TokSpec:
    """How to train one tokenizer family: its class, the algorithm, and its special tokens.

    ``core`` special tokens are placed at the start of the trained vocabulary (ids 0, 1, ...), as the
    family's checkpoints expect (T5: pad=0, eos=1, unk=2); ``extra`` ones are added after it.
    """

    class_name: str
    algorithm: str  # "bpe" | "unigram"
    core: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    init_kwargs: tuple[tuple[str, Any], ...] = ()
    end_of_word_suffix: str = ""
    chat_template: str | None = None


_TOKENIZERS: dict[str, _TokSpec] = {
    "qwen": _TokSpec(
        "Qwen2Tokenizer", "bpe", extra=tuple(_QWEN_SPECIAL[1:]),
        init_kwargs=(("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>"), ("unk_token", None)),
        chat_template=QWEN_CHAT_TEMPLATE,
    ),
    "t5": _TokSpec("T5Tokenizer", "unigram", core=("<pad>", "</s>", "<unk>"), init_kwargs=(("extra_ids", 100),)),
    "clip": _TokSpec("CLIPTokenizer", "bpe", core=("<|startoftext|>", "<|endoftext|>"), end_of_word_suffix="</w>"),
    "roberta": _TokSpec("RobertaTokenizer", "bpe", core=("<s>", "<pad>", "</s>", "<unk>", "<mask>")),
}


def train_tokenizer(family: str, *, vocab_size: int = 2000) -> Any:
    """Train the real tokenizer class of ``family`` ("qwen", "t5", "clip", "roberta") on the corpus.

    The class is first built empty so that its own normalizer and pre-tokenizer are used for
    training; the trained vocabulary (and merges) are then fed to the class's constructor, which is
    exactly how ``from_pretrained`` rebuilds it, so a saved tokenizer reloads identically.
    """
    import transformers
    from tokenizers import pre_tokenizers, trainers

    spec = _TOKENIZERS[family]
    cls = getattr(transformers, spec.class_name)
    kwargs = dict(spec.init_kwargs)
    backend = cls(**kwargs).backend_tokenizer
    if spec.algorithm == "bpe":
        suffix = {"end_of_word_suffix": spec.end_of_word_suffix} if spec.end_of_word_suffix else {}
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(spec.core), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **suffix,
        )
    else:
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(spec.core), unk_token="<unk>", show_progress=False,
        )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    if spec.algorithm == "bpe":
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok = cls(vocab=model["vocab"], merges=merges, **kwargs)
    else:
        # T5 layout: the sentinels close the vocabulary in reverse order (<extra_id_0> is the last id).
        extra_ids = kwargs.get("extra_ids", 0)
        # The Unigram trainer is not deterministic (parallel EM: scores differ in the last bits, and the
        # fallback characters get their scores in hash order). Coarsely rounded scores in a fixed order make
        # every build, and so every neighbour made with it, the same.
        n_special = len(spec.core)
        pieces = [(piece, round(score, 2)) for piece, score in model["vocab"]]
        vocab = pieces[:n_special] + sorted(pieces[n_special:], key=lambda p: (-p[1], p[0]))
        vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
        tok = cls(vocab=vocab, **kwargs)
    if spec.extra:
        tok.add_special_tokens({"additional_special_tokens": list(spec.extra)})
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    return tok


def _padded_vocab(tok: Any, multiple: int = 64) -> int:
    """Model vocabulary rounded up like real checkpoints do (e.g. Qwen 151936 > len(tokenizer))."""
    return -(-len(tok) // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Model builders: one function per architecture family, sizes from one table.
# --------------------------------------------------------------------------------------------

# (text hidden, text layers, heads, kv heads, intermediate); encoders/vision use their own rows. "mini" is
# "tiny" with a text model wide enough to learn the synthetic tasks and memorise (see build_target).
_DIMS = {
    "tiny": {"text": (32, 2, 4, 2, 64), "vision": (32, 2, 4, 64), "audio": (32, 2, 4, 64), "vocab": 2000},
    "mini": {"text": (64, 2, 4, 2, 128), "vision": (32, 2, 4, 64), "audio": (32, 2, 4, 64), "vocab": 2000},
    "small": {"text": (512, 8, 8, 2, 1376), "vision": (256, 8, 4, 512), "audio": (256, 4, 4, 512), "vocab": 4000},
}


def _qwen_text_config(tok: Any, size: str, *, mrope: bool = False) -> dict[str, Any]:
    hidden, layers, heads, kv, inter = _DIMS[size]["text"]
    head_dim = hidden // heads
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if mrope:  # must sum to head_dim / 2; same 1:1.5:1.5-ish split as the real Qwen2.5-VL
        half = head_dim // 2
        rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
    return dict(
        vocab_size=_padded_vocab(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, rope_parameters=rope,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def _ids(tok: Any, **names: str) -> dict[str, int]:
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _build_image_text(size: str) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = train_tokenizer("qwen", vocab_size=_DIMS[size]["vocab"])
    text = _qwen_text_config(tok, size, mrope=True)
    v_hidden, v_depth, v_heads, v_inter = _DIMS[size]["vision"]
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=v_inter, num_heads=v_heads,
                           out_hidden_size=text["hidden_size"], fullatt_block_indexes=[v_depth - 1], window_size=56),
        tie_word_embeddings=True,
        **_ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    )
    unit = 28 * 28  # one merged token = a 28x28 pixel area
    max_tokens = 16 if size != "small" else 64  # a 224x224 image gives this many tokens
    image_processor = Qwen2VLImageProcessor(min_pixels=unit * 4, max_pixels=unit * max_tokens)
    video_processor = Qwen2VLVideoProcessor(min_pixels=unit * 4, max_pixels=unit * 16, min_frames=2, max_frames=16,
                                            fps=2.0, cap_pixels_per_frame=True)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_audio_text(size: str) -> tuple[Any, Any]:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tok = train_tokenizer("qwen", vocab_size=_DIMS[size]["vocab"])
    a_hidden, a_layers, a_heads, a_inter = _DIMS[size]["audio"]
    chunk_seconds = 2  # the synthetic clips are 1-2 s; 200 mel frames -> 100 encoder positions -> 50 tokens
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=a_hidden, encoder_layers=a_layers, encoder_attention_heads=a_heads,
                          encoder_ffn_dim=a_inter, num_mel_bins=128, max_source_positions=chunk_seconds * 50),
        text_config=dict(model_type="qwen2", **_qwen_text_config(tok, size)),
        audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, chunk_length=chunk_seconds)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return Qwen2AudioForConditionalGeneration(config), processor


def _build_text_lm(size: str) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer("qwen", vocab_size=_DIMS[size]["vocab"])
    return Qwen2ForCausalLM(Qwen2Config(**_text_dims(tok, size))), tok


def _text_dims(tok: Any, size: str) -> dict[str, Any]:
    """Text-only Qwen2 sizes: the small variant is a few M parameters, not the VLM's 30 M."""
    cfg = _qwen_text_config(tok, size)
    if size == "small":
        cfg.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=688)
    return cfg


def _build_text_encoder(size: str) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2Model

    tok = train_tokenizer("qwen", vocab_size=_DIMS[size]["vocab"])
    return Qwen2Model(Qwen2Config(**_text_dims(tok, size))), tok


def _build_t5(size: str) -> tuple[Any, Any]:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = train_tokenizer("t5", vocab_size=_DIMS[size]["vocab"])
    d_model, layers, heads, d_ff = (32, 2, 4, 64) if size != "small" else (256, 4, 4, 1024)
    config = T5Config(
        vocab_size=_padded_vocab(tok), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    return T5ForConditionalGeneration(config), tok


def _build_image_encoder(size: str) -> tuple[Any, Any]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = train_tokenizer("clip", vocab_size=_DIMS[size]["vocab"])
    hidden, layers, heads, inter = (32, 2, 4, 64) if size != "small" else (256, 4, 4, 1024)
    image_size = 32 if size != "small" else 64
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=_padded_vocab(tok), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         projection_dim=hidden, **ids),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=heads, projection_dim=hidden),
        projection_dim=hidden,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPModel(config), CLIPProcessor(image_processor=image_processor, tokenizer=tok)


def _build_audio_encoder(size: str) -> tuple[Any, Any]:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tok = train_tokenizer("roberta", vocab_size=_DIMS[size]["vocab"])
    hidden, layers, heads, inter = (32, 2, 4, 64) if size != "small" else (256, 4, 4, 1024)
    patch_hidden = 16 if size != "small" else 64
    # HTSAT folds the (time x mel) spectrogram into a spec_size square: time frames must not exceed
    # spec_size * (spec_size // mel_bins); 2 s at 16 kHz with hop 320 -> 101 frames <= 64 * 2.
    spec_size, mel_bins, seconds, hop = 64, 32, 2, 320
    config = ClapConfig(
        text_config=dict(vocab_size=_padded_vocab(tok), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=130,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         projection_dim=hidden),
        audio_config=dict(spec_size=spec_size, num_mel_bins=mel_bins, patch_size=4, patch_stride=4, window_size=4,
                          depths=[1, 1], num_attention_heads=[2, 4], patch_embeds_hidden_size=patch_hidden,
                          hidden_size=patch_hidden * 2, projection_dim=hidden, enable_fusion=False),
        projection_dim=hidden,
    )
    fe = ClapFeatureExtractor(feature_size=mel_bins, sampling_rate=16000, hop_length=hop, max_length_s=seconds,
                              fft_window_size=640, frequency_max=8000, truncation="rand_trunc")
    return ClapModel(config), ClapProcessor(feature_extractor=fe, tokenizer=tok)


_BUILDERS: dict[str, Callable[[str], tuple[Any, Any]]] = {
    "image-text": _build_image_text,
    "audio-text": _build_audio_text,
    "text-lm": _build_text_lm,
    "t5-infill": _build_t5,
    "text-encoder": _build_text_encoder,
    "image-encoder": _build_image_encoder,
    "audio-encoder": _build_audio_encoder,
}


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached_build(path: Path, wanted: dict[str, Any], make: Callable[[], tuple[Any, Any, dict[str, Any]]]) -> str:
    """Return ``path`` if it holds a finished build matching ``wanted``, else build it with ``make``.

    ``make()`` returns (model, processor, extra marker fields). The marker is written first as
    incomplete and completed last, so an interrupted build is redone, never reused. A folder holding an
    earlier build of something else is cleared; a non-empty folder that is not a build raises.
    """
    marker = _read_marker(path)
    if marker is not None and marker.get("complete") and all(marker.get(k) == v for k, v in wanted.items()):
        return str(path)
    if path.exists() and any(path.iterdir()):
        if marker is None:
            raise ValueError(f"{path} is not empty and holds no {MARKER_FILE}; refusing to overwrite it")
        shutil.rmtree(path)  # our own older or interrupted build
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).write_text(json.dumps({**wanted, "complete": False}), encoding="utf-8")
    model, processor, extra = make()
    model.eval()
    model.save_pretrained(path)  # safetensors
    processor.save_pretrained(path)
    info = {**wanted, "complete": True, "model_class": type(model).__name__,
            "processor_class": type(processor).__name__,
            "num_parameters": int(sum(p.numel() for p in model.parameters())), **extra}
    (path / MARKER_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return str(path)


def _check_kind(kind: str, size: str) -> None:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(_SIZES)}")


def _random_model(kind: str, size: str, seed: int) -> tuple[Any, Any]:
    """The seeded random-weight model and real processor of ``kind``, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[kind](size)


def build_tiny(kind: str, out_dir: str | os.PathLike, *, seed: int = 0, size: str = "tiny") -> str:
    """Save a deterministic random-weight model of ``kind`` with its real processor into ``out_dir``.

    The folder loads offline with ``AutoProcessor`` / ``AutoTokenizer`` and the class named in
    :data:`AUTO_CLASSES`. A folder that already holds a finished build of the same kind, seed and size
    (see :data:`MARKER_FILE`) is returned as is, so session fixtures are cheap. A folder holding an
    earlier build of something else is cleared; a non-empty folder that is not a build raises.
    """
    _check_kind(kind, size)
    wanted = {"format": _MARKER_FORMAT, "kind": kind, "seed": int(seed), "size": size}

    def make() -> tuple[Any, Any, dict[str, Any]]:
        model, processor = _random_model(kind, size, seed)
        return model, processor, {"auto_class": AUTO_CLASSES[kind]}

    return _cached_build(Path(out_dir), wanted, make)


# --------------------------------------------------------------------------------------------
# Synthetic media.
# --------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _brighten(arr: np.ndarray, amount: float) -> np.ndarray:
    """Move every pixel ``amount`` of the way to white (the brightness member shift)."""
    out = arr.astype(np.float32)
    return np.clip(out + (255.0 - out) * amount, 0, 255).astype(np.uint8)


def _render_image(media: dict[str, Any], rng: np.random.Generator, brightness: float) -> Image.Image:
    size = media["size"]
    img = Image.new("RGB", (size, size), _BACKGROUNDS[media["background"]])
    r = size * float(rng.uniform(0.18, 0.3))
    cx, cy = (float(rng.uniform(r + 2, size - r - 2)) for _ in range(2))
    _draw_shape(ImageDraw.Draw(img), media["shape"], cx, cy, r, _COLOURS[media["colour"]][0])
    arr = np.asarray(img)
    arr = np.clip(arr.astype(np.int16) + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)  # mild noise
    return Image.fromarray(_brighten(arr, brightness) if brightness else arr)


def _render_video(media: dict[str, Any], rng: np.random.Generator, brightness: float, frames: int = 8,
                  size: int = 64) -> np.ndarray:
    """``frames`` x H x W x 3 uint8: a shape crossing the frame in one direction."""
    (dx, dy), r = _DIRECTIONS[media["direction"]][0], 9.0
    step = (size - 2 * r - 8) / (frames - 1)
    start = [float(rng.uniform(r + 4, size - r - 4)) for _ in range(2)]
    for axis, d in enumerate((dx, dy)):
        if d:
            start[axis] = r + 4 if d > 0 else size - r - 4
    out = []
    for f in range(frames):
        img = Image.new("RGB", (size, size), _BACKGROUNDS[media["background"]])
        cx, cy = start[0] + dx * step * f, start[1] + dy * step * f
        _draw_shape(ImageDraw.Draw(img), media["shape"], cx, cy, r, _COLOURS[media["colour"]][0])
        out.append(np.asarray(img))
    video = np.stack(out)
    return _brighten(video, brightness) if brightness else video


def _render_audio(media: dict[str, Any], rng: np.random.Generator, loudness: float, sr: int = 16000) -> np.ndarray:
    """Mono float32 wave with ``beeps`` sine tones separated by silence, over faint noise."""
    n = int(media["seconds"] * sr)
    wave_ = rng.normal(0.0, 0.005, n).astype(np.float32)
    beep = int(0.12 * sr)
    gap = min(int(0.1 * sr), (n - media["beeps"] * beep) // (media["beeps"] + 1))
    t = np.arange(beep) / sr
    tone = (0.3 * np.sin(2 * np.pi * media["freq"] * t) * np.hanning(beep)).astype(np.float32)
    pos = gap
    for _ in range(media["beeps"]):
        wave_[pos:pos + beep] += tone
        pos += beep + gap
    return np.clip(wave_ * loudness, -0.99, 0.99)


def _write_wav(path: Path, samples: np.ndarray, sr: int = 16000) -> None:
    """16-bit PCM mono WAV with the standard library (no audio backend needed to write)."""
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sr)
        fh.writeframes((samples * 32767).astype("<i2").tobytes())


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 4) -> None:
    """H.264 mp4 via torchcodec, else torchvision.io (PyAV); both need FFmpeg libraries."""
    errors = []
    try:
        from torchcodec.encoders import VideoEncoder

        VideoEncoder(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), frame_rate=fps).to_file(str(path))
        return
    except Exception as exc:  # noqa: BLE001 - try the next backend, report all at the end
        errors.append(f"torchcodec: {exc}")
    try:
        import torchvision.io

        torchvision.io.write_video(str(path), torch.from_numpy(frames), fps=fps)
        return
    except Exception as exc:  # noqa: BLE001
        errors.append(f"torchvision.io: {exc}")
    raise RuntimeError(f"cannot write {path}: no working video encoder (install FFmpeg). " + " | ".join(errors))


_SHIFT_KEYS = {"brightness": "image", "loudness": "audio", "year": "any"}


def _check_shift(member_shift: dict | None) -> dict[str, Any]:
    shift = dict(member_shift or {})
    unknown = sorted(set(shift) - set(_SHIFT_KEYS))
    if unknown:
        raise ValueError(f"member_shift: unknown key(s) {unknown}; expected some of {sorted(_SHIFT_KEYS)}")
    return shift


def make_synthetic_samples(
    out_dir: str | os.PathLike,
    *,
    modality: str,
    n: int,
    seed: int = 0,
    language: str = "ru",
    member_shift: dict | None = None,
    member_fraction: float = 0.5,
) -> str:
    """Write ``samples.csv`` (+ ``media/``) of MERA-style multiple-choice samples; return the csv path.

    Columns: ``input``, ``answer`` (the correct letter), ``ds_name``, the media column (``image`` |
    ``audio`` | ``video``, relative paths; none for ``"text"``) and ``label`` (1 on ``member_fraction`` of the
    rows, rounded, in random order). The media really determines the answer (shape/colour of a drawn figure,
    number of beeps, direction of motion).
    ``member_shift`` injects a model-free cue into label-1 rows, for testing the blind baselines:
    ``{"brightness": 0.3}`` (images and video frames brighter), ``{"loudness": 2.0}`` (audio louder),
    ``{"year": True}`` (prompts mention a later year).
    """
    import pandas as pd

    if modality not in _PLACEHOLDER:
        raise ValueError(f"unknown modality {modality!r}; expected one of image, audio, video, text")
    if language not in _TEXT:
        raise ValueError(f"unknown language {language!r}; expected 'ru' or 'en'")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= member_fraction <= 1:
        raise ValueError(f"member_fraction must be in [0, 1], got {member_fraction}")
    shift = _check_shift(member_shift)
    out = Path(out_dir)
    media_dir = out / "media"
    if modality != "text":
        media_dir.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) < round(n * member_fraction)).astype(int)
    ext = {"image": "png", "audio": "wav", "video": "mp4"}.get(modality)
    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None  # type: ignore[assignment]
    indices: Iterator[int] | Any = range(n)
    if tqdm is not None and n >= 200:
        indices = tqdm(indices, desc=f"synthetic {modality}", unit="sample")
    for i in indices:
        label = int(labels[i])
        item = _make_item(modality, language, rng)
        text = item.input
        if shift.get("year"):
            year = int(rng.integers(2019, 2025) if label else rng.integers(2008, 2015))
            text = _TEXT[language]["year"].format(year=year) + "\n" + text
        row: dict[str, Any] = {"input": text, "answer": item.answer, "ds_name": f"synthetic_{modality}"}
        if ext is not None:
            rel = f"media/{modality}_{i:05d}.{ext}"
            if modality == "image":
                _render_image(item.media, rng, float(shift.get("brightness", 0.0)) * label).save(out / rel)
            elif modality == "audio":
                loud = float(shift.get("loudness", 1.0)) if label else 1.0
                _write_wav(out / rel, _render_audio(item.media, rng, loud))
            else:
                _write_mp4(out / rel, _render_video(item.media, rng, float(shift.get("brightness", 0.0)) * label))
            row[modality] = rel
        row["label"] = label
        rows.append(row)
    csv_path = out / "samples.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return str(csv_path)


# --------------------------------------------------------------------------------------------
# Pretrained-like targets: kit models that have learnt the task format.
# --------------------------------------------------------------------------------------------

#: The kit architecture behind the pretrained-like target of each modality (:func:`build_target`).
TARGET_KINDS = {"image": "image-text", "video": "image-text", "audio": "audio-text", "text": "text-lm"}
# Pool and held-out draws use seeds far from those callers give make_synthetic_samples for their own data.
_POOL_SEED, _HELDOUT_SEED = 7_000_000, 8_000_000


def build_target(
    modality: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: str = "mini",
    pool_size: int = 256,
    epochs: int = 6,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
) -> str:
    """Save a *pretrained-like* target for ``modality``: the kit model of its family (:data:`TARGET_KINDS`),
    fully trained as a language model (every text token) on a disjoint pool of synthetic samples.

    Why: a random-weight target answers uniformly over its vocabulary (≈ ln V nats), and one that only
    ever learnt the answer letters answers every prompt alike; neither is a model whose members differ
    from its non-members. Language-model training stands in for pre-training: the target then answers
    in the task's format (held-out answer loss near ln 4 for four options, lower where it reads the
    answer off the media) and its state at the answer depends on the prompt, so fine-tuning on members
    (``fimmia_hf.finetune``) can memorise them. The held-out answer loss is measured on samples drawn
    apart from the pool and recorded in :data:`MARKER_FILE` (``heldout_answer_loss``). Cached like
    :func:`build_tiny`: a folder with a finished build of the same recipe is returned as is.
    """
    if modality not in TARGET_KINDS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(TARGET_KINDS)}")
    kind = TARGET_KINDS[modality]
    _check_kind(kind, size)
    wanted = {"format": _MARKER_FORMAT, "kind": f"target-{modality}", "seed": int(seed), "size": size,
              "pool_size": pool_size, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}

    def make() -> tuple[Any, Any, dict[str, Any]]:
        import tempfile

        from .data import load_samples

        model, processor = _random_model(kind, size, seed)
        with tempfile.TemporaryDirectory(prefix="fimmia-target-") as tmp:
            def draw(name: str, n: int, draw_seed: int) -> Any:
                csv = make_synthetic_samples(Path(tmp) / name, modality=modality, n=n, seed=draw_seed)
                return load_samples(csv)

            pool = draw("pool", pool_size, _POOL_SEED + seed)
            heldout = draw("heldout", 64, _HELDOUT_SEED + seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _train_language_model(model, processor, modality, pool, epochs=epochs, learning_rate=learning_rate,
                                      batch_size=batch_size, seed=seed)
            loss = _answer_loss(model, processor, modality, heldout)
        return model, processor, {"auto_class": AUTO_CLASSES[kind], "heldout_answer_loss": round(loss, 4)}

    return _cached_build(Path(out_dir), wanted, make)


def _collator(processor: Any, modality: str, *, answer_only: bool) -> Any:
    from .chat import ChatEncoder
    from .finetuning import ChatCollator

    return ChatCollator(ChatEncoder(processor, answer_only=answer_only), None if modality == "text" else modality)


def _fit(model: Any, batches: Callable[[], Iterator[dict[str, Any]]], *, epochs: int, steps_per_epoch: int,
         learning_rate: float, desc: str) -> None:
    """Full AdamW training (no weight decay, gradients clipped at 1): the loop both kit pretrainings share.
    ``batches()`` yields one epoch of model inputs with labels."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            for batch in batches():
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                bar.update()
    model.eval()


def _train_language_model(
    model: Any, processor: Any, modality: str, samples: Any, *, epochs: int, learning_rate: float, batch_size: int,
    seed: int,
) -> None:
    """Full AdamW training on every text token of ``samples`` (media features in, never as targets)."""
    collator = _collator(processor, modality, answer_only=False)
    encodings = [collator.encode(row) for row in samples]  # media decoded once, not once per epoch
    rng = np.random.default_rng(seed)

    def batches() -> Iterator[dict[str, Any]]:
        order = rng.permutation(len(encodings))
        for start in range(0, len(order), batch_size):
            yield collator.collate([encodings[i] for i in order[start:start + batch_size]])

    _fit(model, batches, epochs=epochs, steps_per_epoch=-(-len(encodings) // batch_size), learning_rate=learning_rate,
         desc=f"pretraining the kit {modality} target")


@torch.no_grad()
def _answer_loss(model: Any, processor: Any, modality: str, samples: Any) -> float:
    """Mean answer loss (nats per answer token) of ``samples``: how well the target knows the task."""
    collator = _collator(processor, modality, answer_only=True)
    losses = [float(model(**collator([row])).loss) for row in samples]
    return float(np.mean(losses))


def build_infiller(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: str = "tiny",
    epochs: int = 20,
    learning_rate: float = 1e-2,
    batch_size: int = 16,
    mask_ratio: float = 0.15,
) -> str:
    """Save the kit T5 (kind ``"t5-infill"``) trained to fill masked words on the kit's corpus.

    A random T5 fills a masked word with whatever tokens its weights happen to favour (``№55 №55 №55``),
    so "fill" neighbours would be noise rather than the word-level edits FiMMIA is about. Trained on the
    tokenizer corpus with T5's own objective (each masked word a sentinel, the target
    ``<extra_id_0> word <extra_id_1> word ... </s>``), it fills in words. The share of held-out masked
    words it restores exactly is recorded in :data:`MARKER_FILE` (``heldout_word_accuracy``). Cached
    like :func:`build_tiny`.
    """
    kind = "t5-infill"
    _check_kind(kind, size)
    wanted = {"format": _MARKER_FORMAT, "kind": "infiller", "seed": int(seed), "size": size, "epochs": epochs,
              "learning_rate": learning_rate, "batch_size": batch_size, "mask_ratio": mask_ratio}

    def make() -> tuple[Any, Any, dict[str, Any]]:
        model, tok = _random_model(kind, size, seed)
        lines = _corpus()
        order = np.random.default_rng(seed).permutation(len(lines))
        heldout = [lines[i] for i in order[:32]]
        train = [lines[i] for i in order[32:]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _train_span_filling(model, tok, train, epochs=epochs, learning_rate=learning_rate,
                                batch_size=batch_size, mask_ratio=mask_ratio, seed=seed)
        accuracy = _fill_accuracy(model, tok, heldout, mask_ratio=mask_ratio, seed=seed)
        return model, tok, {"auto_class": AUTO_CLASSES[kind], "heldout_word_accuracy": round(accuracy, 4)}

    return _cached_build(Path(out_dir), wanted, make)


def _mask_words(line: str, rng: np.random.Generator, ratio: float) -> tuple[str, list[str]]:
    """Replace about ``ratio`` of the words of ``line`` by T5 sentinels; return the text and the words."""
    words = line.split(" ")
    n = min(len(words), max(1, round(len(words) * ratio)), 100)
    chosen = sorted(rng.choice(len(words), size=n, replace=False).tolist())
    masked = []
    for j, i in enumerate(chosen):
        masked.append(words[i])
        words[i] = f"<extra_id_{j}>"
    return " ".join(words), masked


def _fill_target(masked: list[str]) -> str:
    return "".join(f"<extra_id_{j}> {word} " for j, word in enumerate(masked)).rstrip()


def _train_span_filling(
    model: Any, tok: Any, lines: list[str], *, epochs: int, learning_rate: float, batch_size: int, mask_ratio: float,
    seed: int,
) -> None:
    """AdamW on T5's span-filling objective, a fresh masking of every line each epoch."""
    rng = np.random.default_rng(seed)

    def batches() -> Iterator[dict[str, Any]]:
        order = rng.permutation(len(lines))
        for start in range(0, len(order), batch_size):
            pairs = [_mask_words(lines[i], rng, mask_ratio) for i in order[start:start + batch_size]]
            batch = tok([p[0] for p in pairs], text_target=[_fill_target(p[1]) for p in pairs],
                        return_tensors="pt", padding=True)
            batch["labels"][batch["labels"] == tok.pad_token_id] = -100
            yield batch

    _fit(model, batches, epochs=epochs, steps_per_epoch=-(-len(lines) // batch_size), learning_rate=learning_rate,
         desc="pretraining the kit infiller")


@torch.no_grad()
def _fill_accuracy(model: Any, tok: Any, lines: list[str], *, mask_ratio: float, seed: int) -> float:
    """Share of masked words the model restores exactly (greedy decoding)."""
    rng = np.random.default_rng(seed + 1)
    pairs = [_mask_words(line, rng, mask_ratio) for line in lines]
    batch = tok([p[0] for p in pairs], return_tensors="pt", padding=True)
    longest = max(len(p[1]) for p in pairs)
    out = model.generate(**batch, max_new_tokens=8 * longest + 4, do_sample=False)
    right = total = 0
    for ids, (_, masked) in zip(out, pairs):
        text = tok.decode(ids, skip_special_tokens=False).replace("<pad>", "").replace("</s>", "")
        fills = [piece.strip() for piece in re.split(r"<extra_id_\d+>", text)[1:]]
        right += sum(a == b for a, b in zip(fills, masked))
        total += len(masked)
    return right / max(total, 1)


# --------------------------------------------------------------------------------------------
# Synthetic stage features for detector tests.
# --------------------------------------------------------------------------------------------


def synthetic_features(
    n: int = 64, *, k: int = 4, dim: int = 8, shift: float = 1.0, seed: int = 0, ds_names: int = 2
) -> Any:
    """A ``datasets.Dataset`` with the columns the scoring + embedding stages produce.

    Members (label 1) get neighbour losses that rise more above the original loss
    (ΔL_k = L'_k − L has mean ``0.2 + shift`` vs 0.2), as fine-tuning makes the exact text
    unusually likely; ``shift=0`` gives an uninformative control. Embeddings are noise around a
    per-sample vector, with neighbour embeddings close to the original.
    """
    import datasets

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    loss = rng.uniform(0.5, 2.5, n)
    delta = rng.normal(0.2, 0.3, (n, k)) + shift * labels[:, None]
    emb = rng.normal(0.0, 1.0, (n, dim))
    neigh_emb = emb[:, None, :] + rng.normal(0.0, 0.1, (n, k, dim))
    return datasets.Dataset.from_dict({
        "sample_id": [f"syn-{i:05d}" for i in range(n)],
        "input": [f"Sample question {i}?\nA. one\nB. two\nC. three\nD. four\nANSWER:" for i in range(n)],
        "answer": [_LETTERS[i % 4] for i in range(n)],
        "ds_name": [f"synthetic_{chr(ord('a') + i % ds_names)}" for i in range(n)],
        "label": labels.astype(int).tolist(),
        "loss": loss.astype(np.float32).tolist(),
        "neighbor_losses": (loss[:, None] + delta).astype(np.float32).tolist(),
        "embedding": emb.astype(np.float32).tolist(),
        "neighbor_embeddings": neigh_emb.astype(np.float32).tolist(),
    })
