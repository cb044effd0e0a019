"""The glider-mini task suite: T0-style templated prompts over four small input worlds, generated deterministically.

Held-in tasks (one LoRA expert each) come in groups that share one input distribution and differ only by the
instruction (five tasks over the same word lists, four over the same story sentences, two over the same reviews),
so that a router looking at one token at a time cannot tell them apart. Held-out tasks have no expert: they ask
for held-in skills through new formats, paraphrased instructions and compositions.

Every task has several prompt templates; the last `eval_templates` of a held-in task are never used for training
(validation and test draw from all templates). The input space of every world is split by a hash of the raw input,
so no validation or test input ever appears in a training prompt or in the unlabeled pretraining text.

Multiple-choice tasks are scored by rank classification over `choices`; generation tasks by exact match.
"""

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 300}

# World 1: lists of 3-6 distinct words, each word from one of five categories.
CATEGORIES = {
    "animal": ("cat", "dog", "horse", "mouse", "tiger", "rabbit", "sheep", "whale"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "brown", "pink"),
    "tool": ("hammer", "saw", "drill", "knife", "brush", "shovel", "ladder", "rope"),
    "vehicle": ("car", "bus", "train", "truck", "boat", "plane", "bike", "ship"),
}
CATEGORY_OF = {word: category for category, words in CATEGORIES.items() for word in words}
WORDS = sorted(CATEGORY_OF)

# World 2: one-sentence stories: someone did something to an object somewhere at some time.
NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar")
VERBS = ("painted", "washed", "found", "carried", "fixed", "sold", "hid", "cleaned", "dropped", "bought")
ADJECTIVES = ("old", "new", "small", "large", "shiny", "broken", "heavy", "wooden")
OBJECTS = ("box", "chair", "lamp", "book", "bag", "clock", "table", "bottle", "hammer", "bike", "ladder", "basket")
PLACES = ("kitchen", "garden", "park", "school", "office", "market", "library", "station", "garage", "attic")
TIMES = ("yesterday", "on monday", "at night", "this morning", "last week", "at noon")

# World 3: one- or two-clause restaurant reviews about one aspect, with one polarity.
ASPECTS = {
    "food": (
        ("soup", "pasta", "bread", "salad", "dessert", "coffee", "fish", "pizza"),
        ("delicious", "tasty", "fresh", "excellent", "perfect"),
        ("cold", "bland", "stale", "awful", "too salty"),
    ),
    "service": (
        ("waiter", "staff", "service", "owner", "waitress", "host"),
        ("friendly", "helpful", "quick", "polite", "kind"),
        ("rude", "slow", "careless", "unfriendly", "grumpy"),
    ),
    "price": (
        ("bill", "price", "wine list", "lunch menu", "check"),
        ("fair", "cheap", "reasonable", "a bargain", "good value"),
        ("high", "steep", "outrageous", "unfair", "a rip-off"),
    ),
    "ambience": (
        ("music", "room", "lighting", "terrace", "decor", "view"),
        ("cozy", "calm", "lovely", "bright", "charming"),
        ("noisy", "dark", "cramped", "gloomy", "dirty"),
    ),
}
SENTIMENTS = ("positive", "negative")

# World 4: pairs of whole numbers from 1 to 99.
NUMBERS = range(1, 100)


@dataclass(frozen=True)
class Example:
    """One prompt. `choices` is set for multiple-choice examples (the target is one of them)."""

    task: str
    input: str
    target: str
    choices: tuple[str, ...] | None = None
    template: int = 0


@dataclass(frozen=True)
class Task:
    """A task: templates over one world, an answer function, and its instructions.

    `instruction` is the expert's instruction (held-in tasks only), written once by hand in the style GLIDER's LLM
    writes them. `query_instruction` is written separately, in other words, as an instruction a user or an LLM
    would give for one query of this task; the benchmark embeds it for "GLIDER with the instruction given".
    """

    name: str
    world: str
    kind: str  # "generation" or "multiple_choice"
    templates: tuple[str, ...]
    answer: Callable[[dict], str]
    query_instruction: str
    instruction: str = ""
    choices: Callable[[dict], tuple[str, ...]] | None = None
    eval_templates: int = 0  # the last ones, held-in tasks: never used for training
    held_out: bool = False
    skills: tuple[str, ...] = field(default_factory=tuple)  # held-out: the held-in tasks whose skills it needs

    @property
    def train_templates(self) -> tuple[str, ...]:
        return self.templates[: len(self.templates) - self.eval_templates]


# Sampling one raw input of each world; `key` identifies the input for the train/validation/test partition.


def _sample_words(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return {"key": " ".join(words), "text": ", ".join(words), "list": words, "words": ", ".join(words)}


def _sample_story(rng: random.Random) -> dict:
    fields = {
        "name": rng.choice(NAMES),
        "verb": rng.choice(VERBS),
        "adjective": rng.choice(ADJECTIVES),
        "object": rng.choice(OBJECTS),
        "place": rng.choice(PLACES),
        "time": rng.choice(TIMES),
    }
    if rng.random() < 0.5:
        story = "{name} {verb} the {adjective} {object} in the {place} {time}.".format(**fields)
    else:
        story = "{Time}, {name} {verb} the {adjective} {object} in the {place}.".format(
            Time=fields["time"].capitalize(), **fields
        )
    others = [p for p in PLACES if p != fields["place"]]
    return {
        **fields,
        "key": story,
        "text": story,
        "story": story,
        "place_options": _shuffled(rng, [fields["place"], *rng.sample(others, 2)]),
    }


def _sample_review(rng: random.Random) -> dict:
    aspect = rng.choice(sorted(ASPECTS))
    sentiment = rng.choice(SENTIMENTS)
    things, positive, negative = ASPECTS[aspect]
    adjectives = positive if sentiment == "positive" else negative
    first, second = rng.sample(things, 2)
    review = f"The {first} was {rng.choice(adjectives)}"
    if rng.random() < 0.6:
        review += f" and the {second} was {rng.choice(adjectives)}"
    review += "."
    return {"key": review, "text": review, "review": review, "aspect": aspect, "sentiment": sentiment}


def _sample_numbers(rng: random.Random) -> dict:
    a, b = rng.sample(NUMBERS, 2)
    return {
        "key": f"{a} {b}",
        "text": f"{a} and {b}",
        "a": str(a),
        "b": str(b),
        "larger": str(max(a, b)),
        "smaller": str(min(a, b)),
    }


def _shuffled(rng: random.Random, items: list) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


WORLDS: dict[str, Callable[[random.Random], dict]] = {
    "words": _sample_words,
    "story": _sample_story,
    "review": _sample_review,
    "numbers": _sample_numbers,
}

CATEGORY_LIST = "animal, fruit, color, tool, vehicle"

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        # Held-in, world "words": five tasks on the same word lists.
        Task(
            "reverse_words",
            "words",
            "generation",
            (
                "Reverse the order of these words: {words}",
                "Here is a list of words: {words}. Write the same words from last to first.",
                "{words} -- write this list backwards, word by word.",
                "Read the words {words} in reverse order and write them down.",
                "Words: {words}. What is this list when its order is flipped?",
            ),
            lambda f: ", ".join(reversed(f["list"])),
            instruction="Reverse the order of the words in the given list and answer with the reversed list.",
            query_instruction="Write the list of words backwards, starting from the last word.",
            eval_templates=2,
        ),
        Task(
            "sort_words",
            "words",
            "generation",
            (
                "Sort these words alphabetically: {words}",
                "Put the following words in alphabetical order: {words}",
                "{words} -- arrange these words from A to Z.",
                "Order the words {words} as they would appear in a dictionary.",
                "Alphabetize the list: {words}",
            ),
            lambda f: ", ".join(sorted(f["list"])),
            instruction="Sort the words of the given list into alphabetical order and answer with the sorted list.",
            query_instruction="Arrange the words in A to Z order.",
            eval_templates=2,
        ),
        Task(
            "count_words",
            "words",
            "generation",
            (
                "How many words are in this list: {words}",
                "Count the words: {words}",
                "{words} -- how many items does this list have?",
                "Tell me the number of words in the list {words}.",
                "List: {words}. Number of words:",
            ),
            lambda f: str(len(f["list"])),
            instruction="Count the words in the given list and answer with the number as digits.",
            query_instruction="Say how many items the list contains.",
            eval_templates=2,
        ),
        Task(
            "last_word",
            "words",
            "generation",
            (
                "What is the last word in this list: {words}",
                "Give the final word of the list {words}.",
                "{words} -- which word comes at the end?",
                "Which word closes the list {words}?",
                "List: {words}. Last word:",
            ),
            lambda f: f["list"][-1],
            instruction="Find the last word of the given list and answer with that word.",
            query_instruction="Return the word at the end of the list.",
            eval_templates=2,
        ),
        Task(
            "first_category",
            "words",
            "multiple_choice",
            (
                "What kind of thing is the first word in {words}? Options: " + CATEGORY_LIST + ".",
                "The list {words} starts with a word. Is it an animal, a fruit, a color, a tool or a vehicle?",
                "{words} -- name the category of the first word: animal, fruit, color, tool or vehicle.",
                "Look at the first item of {words}. Which group does it belong to: " + CATEGORY_LIST + "?",
                "List: {words}. Category of the first word (" + CATEGORY_LIST + "):",
            ),
            lambda f: CATEGORY_OF[f["list"][0]],
            choices=lambda f: tuple(CATEGORIES),
            instruction=(
                "Classify the first word of the given list as an animal, fruit, color, tool or vehicle and answer "
                "with that category."
            ),
            query_instruction="Tell which group the opening word of the list belongs to.",
            eval_templates=2,
        ),
        # Held-in, world "story": four questions about the same sentences.
        Task(
            "story_who",
            "story",
            "generation",
            (
                "{story} Who did something in this sentence?",
                "Read the sentence and say who acted: {story}",
                "Sentence: {story} Question: which person is it about?",
                "{story} Name the person in this story.",
                "Who is the sentence {story} about?",
            ),
            lambda f: f["name"],
            instruction="Read the given sentence and answer with the name of the person who did the action.",
            query_instruction="Identify the person in the sentence.",
            eval_templates=2,
        ),
        Task(
            "story_where",
            "story",
            "generation",
            (
                "{story} Where did it happen?",
                "Read the sentence and say where it took place: {story}",
                "Sentence: {story} Question: in which room or place was it?",
                "{story} Name the location in this story.",
                "Where does the sentence {story} take place?",
            ),
            lambda f: f["place"],
            instruction="Read the given sentence and answer with the place where the action happened.",
            query_instruction="Identify the location of the event in the sentence.",
            eval_templates=2,
        ),
        Task(
            "story_what",
            "story",
            "generation",
            (
                "{story} What object is mentioned?",
                "Read the sentence and say which thing was handled: {story}",
                "Sentence: {story} Question: what was the object?",
                "{story} Name the thing in this story.",
                "Which object does the sentence {story} talk about?",
            ),
            lambda f: f["object"],
            instruction="Read the given sentence and answer with the object that the person acted on.",
            query_instruction="Identify the item that someone did something with in the sentence.",
            eval_templates=2,
        ),
        Task(
            "story_when",
            "story",
            "multiple_choice",
            (
                "{story} When did it happen? Options: " + ", ".join(TIMES) + ".",
                "Read the sentence and say when it took place: {story}",
                "Sentence: {story} Question: at what time was it?",
                "{story} Name the time in this story.",
                "When does the sentence {story} take place?",
            ),
            lambda f: f["time"],
            choices=lambda f: TIMES,
            instruction="Read the given sentence and answer with the time when the action happened.",
            query_instruction="Identify the moment at which the event in the sentence took place.",
            eval_templates=2,
        ),
        # Held-in, world "review": two questions about the same reviews.
        Task(
            "review_sentiment",
            "review",
            "multiple_choice",
            (
                "Review: {review} Is this review positive or negative?",
                "{review} Did the customer like it? Answer positive or negative.",
                "What is the sentiment of this review: {review}",
                "{review} Is the tone of this review positive or negative?",
                "Customer comment: {review} Sentiment (positive or negative):",
            ),
            lambda f: f["sentiment"],
            choices=lambda f: SENTIMENTS,
            instruction="Decide whether the given restaurant review is positive or negative and answer with that word.",
            query_instruction="Judge whether the customer was pleased or displeased.",
            eval_templates=2,
        ),
        Task(
            "review_topic",
            "review",
            "multiple_choice",
            (
                "Review: {review} Is this review about the food, service, price or ambience?",
                "{review} What does the customer talk about? Answer food, service, price or ambience.",
                "What is the topic of this review: {review}",
                "{review} Which aspect of the restaurant is discussed: food, service, price or ambience?",
                "Customer comment: {review} Topic (food, service, price, ambience):",
            ),
            lambda f: f["aspect"],
            choices=lambda f: tuple(ASPECTS),
            instruction=(
                "Decide whether the given restaurant review talks about the food, service, price or ambience and "
                "answer with that aspect."
            ),
            query_instruction="Say which part of the restaurant experience the comment is about.",
            eval_templates=2,
        ),
        # Held-in, world "numbers": two questions about the same pairs.
        Task(
            "larger_number",
            "numbers",
            "generation",
            (
                "Which is larger, {a} or {b}?",
                "Give the bigger of the two numbers {a} and {b}.",
                "{a} and {b} -- which number is greater?",
                "Of {a} and {b}, which one is more?",
                "Numbers: {a}, {b}. Maximum:",
            ),
            lambda f: f["larger"],
            instruction="Compare the two given numbers and answer with the larger one.",
            query_instruction="Return the maximum of the two numbers.",
            eval_templates=2,
        ),
        Task(
            "smaller_number",
            "numbers",
            "generation",
            (
                "Which is smaller, {a} or {b}?",
                "Give the lower of the two numbers {a} and {b}.",
                "{a} and {b} -- which number is less?",
                "Of {a} and {b}, which one is fewer?",
                "Numbers: {a}, {b}. Minimum:",
            ),
            lambda f: f["smaller"],
            instruction="Compare the two given numbers and answer with the smaller one.",
            query_instruction="Return the minimum of the two numbers.",
            eval_templates=2,
        ),
        # Held-out: held-in skills through new formats, paraphrases and compositions; no expert, no training.
        Task(
            "first_alphabetical",
            "words",
            "multiple_choice",
            (
                "Which of these words comes first in the alphabet: {words}?",
                "{words} -- which word would a dictionary list first?",
                "Pick the word that is earliest in alphabetical order among {words}.",
            ),
            lambda f: min(f["list"]),
            choices=lambda f: tuple(f["list"]),
            query_instruction="Choose the word of the list that comes first in alphabetical order.",
            held_out=True,
            skills=("sort_words",),
        ),
        Task(
            "last_category",
            "words",
            "multiple_choice",
            (
                "What kind of thing is the last word in {words}? Options: " + CATEGORY_LIST + ".",
                "The list {words} ends with a word. Is it an animal, a fruit, a color, a tool or a vehicle?",
                "{words} -- which group does the final word belong to: " + CATEGORY_LIST + "?",
            ),
            lambda f: CATEGORY_OF[f["list"][-1]],
            choices=lambda f: tuple(CATEGORIES),
            query_instruction="Tell which group the final word of the list belongs to.",
            held_out=True,
            skills=("last_word", "first_category"),
        ),
        Task(
            "story_place_choice",
            "story",
            "multiple_choice",
            (
                "{story} In which of these places did it happen: {options}?",
                "{story} Pick the location: {options}.",
                "Was this in the {option0}, the {option1} or the {option2}? {story}",
            ),
            lambda f: f["place"],
            choices=lambda f: tuple(f["place_options"]),
            query_instruction="Pick the place where the event in the sentence happened from the options.",
            held_out=True,
            skills=("story_where",),
        ),
        Task(
            "review_recommend",
            "review",
            "multiple_choice",
            (
                "{review} Would this customer recommend the restaurant? Answer yes or no.",
                "{review} Will the writer come back? yes or no",
                "Based on the review '{review}', was the visit a success? Answer yes or no.",
            ),
            lambda f: "yes" if f["sentiment"] == "positive" else "no",
            choices=lambda f: ("yes", "no"),
            query_instruction="Say yes if the customer enjoyed the visit and no otherwise.",
            held_out=True,
            skills=("review_sentiment",),
        ),
        Task(
            "story_person",
            "story",
            "generation",
            (
                "Whose action does this describe? {story}",
                "{story} Tell me the name of the one who did it.",
                "Find the character: {story}",
            ),
            lambda f: f["name"],
            query_instruction="Give the name of the character who acts in the sentence.",
            held_out=True,
            skills=("story_who",),
        ),
    ]
}
HELD_IN = [name for name, task in TASKS.items() if not task.held_out]
HELD_OUT = [name for name, task in TASKS.items() if task.held_out]


def input_split(key: str) -> str:
    """The split an input belongs to, by a hash of the raw input: 5% validation, 5% test, the rest train."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def _render(task: Task, template_index: int, fields: dict) -> Example:
    options = fields.get("place_options", ())
    values = {**fields, "options": ", ".join(options), **{f"option{i}": o for i, o in enumerate(options)}}
    choices = task.choices(fields) if task.choices else None
    return Example(
        task.name, task.templates[template_index].format(**values), task.answer(fields), choices, template_index
    )


def examples(task: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """`n` examples (default `DEFAULT_SIZES[split]`) of `task` in `split`, the same on every machine for a seed.

    The training split uses the training templates only; validation and test use all templates in turn, so half
    and more of their prompts are worded in ways no expert was trained on.
    """
    if task not in TASKS:
        raise KeyError(f"Unknown task {task!r}; the suite has {list(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    spec = TASKS[task]
    if spec.held_out and split == "train":
        raise ValueError(f"{task!r} is a held-out task: it has no training split.")
    n = DEFAULT_SIZES[split] if n is None else n
    rng = random.Random(f"glider-mini/{task}/{split}/{seed}")
    sample = WORLDS[spec.world]
    templates = range(len(spec.train_templates)) if split == "train" else range(len(spec.templates))
    out = []
    while len(out) < n:
        fields = sample(rng)
        if input_split(fields["key"]) != split:
            continue
        template = rng.choice(templates) if split == "train" else templates[len(out) % len(templates)]
        out.append(_render(spec, template, fields))
    return out


def pretraining_text(n_per_world: int = 4000, seed: int = 0) -> list[str]:
    """Unlabeled text for span-corruption pretraining: training-split inputs of every world, bare and inside the
    training templates of the held-in tasks on that world. No answers, no validation or test input."""
    rng = random.Random(f"glider-mini/pretraining/{seed}")
    text = []
    for world, sample in WORLDS.items():
        tasks = [TASKS[name] for name in HELD_IN if TASKS[name].world == world]
        start = len(text)
        while len(text) - start < n_per_world:
            fields = sample(rng)
            if input_split(fields["key"]) != "train":
                continue
            if rng.random() < 0.3:
                text.append(fields["text"])
            else:
                task = rng.choice(tasks)
                text.append(_render(task, rng.randrange(len(task.train_templates)), fields).input)
    return text


def tokenizer_text(seed: int = 0) -> Iterator[str]:
    """Text for training the tokenizer: the pretraining text, the training answers, every template and every
    instruction (a tokenizer should know the words of all prompts, as a real T5's does)."""
    yield from pretraining_text(seed=seed)
    for name in HELD_IN:
        for example in examples(name, "train", 500, seed=seed):
            yield example.target
    for task in TASKS.values():
        yield from task.templates
        yield from (task.instruction, task.query_instruction)
        if task.choices is not None and not task.held_out:
            yield from task.choices(WORLDS[task.world](random.Random(0)))
