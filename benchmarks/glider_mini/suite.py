"""The glider-mini task suite: T0-style templated prompts over four small input worlds, generated deterministically.

Held-in tasks (one LoRA expert each) come in groups that share one input distribution and differ only by the
instruction: five tasks over the same word lists (pick the animal, the fruit, ...), four over the same story
sentences (who, where, what, when), two over the same reviews and two over the same timetable entries. A router
that looks at one token at a time sees the same tokens for every task of a group. Held-out tasks have no expert:
they ask for held-in skills through new formats, paraphrased instructions and compositions.

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

# World 1: lists of five words, one from each category, in random order.
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

# World 4: timetable entries: a vehicle to a city, leaving at an hour from a platform (hours and platforms overlap).
VEHICLES = ("train", "bus", "ferry", "coach", "tram")
CITIES = (
    "Oslo",
    "Paris",
    "Rome",
    "Berlin",
    "Madrid",
    "Vienna",
    "Prague",
    "Lisbon",
    "Dublin",
    "Athens",
    "Warsaw",
    "Zurich",
)
SCHEDULES = (
    "The {vehicle} to {city} leaves at {hour} from platform {platform}.",
    "At {hour} o'clock, the {vehicle} for {city} departs from platform {platform}.",
    "Platform {platform}: {vehicle} to {city}, departing at {hour}.",
)


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
    by_category = {category: rng.choice(words) for category, words in CATEGORIES.items()}
    words = _shuffled(rng, list(by_category.values()))
    pairs = [
        (by_category["fruit"], by_category["color"]),
        (by_category["color"], by_category["fruit"]),
        (by_category["fruit"], by_category["tool"]),
        (by_category["animal"], by_category["color"]),
    ]
    return {
        "key": " ".join(words),
        "text": ", ".join(words),
        "list": words,
        "words": ", ".join(words),
        **by_category,
        "pair_options": _shuffled(rng, [", ".join(pair) for pair in pairs]),
    }


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
    adjective, other = rng.sample(adjectives, 2)
    review = f"The {first} was {adjective}"
    if rng.random() < 0.6:
        review += f" and the {second} was {other}"
    review += "."
    return {"key": review, "text": review, "review": review, "aspect": aspect, "sentiment": sentiment}


def _sample_schedule(rng: random.Random) -> dict:
    fields = {
        "vehicle": rng.choice(VEHICLES),
        "city": rng.choice(CITIES),
        "hour": str(rng.randint(1, 12)),
        "platform": str(rng.randint(1, 12)),
    }
    schedule = rng.choice(SCHEDULES).format(**fields)
    return {**fields, "key": schedule, "text": schedule, "schedule": schedule}


def _shuffled(rng: random.Random, items: list) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


WORLDS: dict[str, Callable[[random.Random], dict]] = {
    "words": _sample_words,
    "story": _sample_story,
    "review": _sample_review,
    "schedule": _sample_schedule,
}


def _pick(category: str, kind: str, article: str) -> Task:
    """Held-in, world "words": name the list's word of one category."""
    return Task(
        f"pick_{category}",
        "words",
        kind,
        (
            f"Which word in this list names {article} {category}: {{words}}?",
            f"{{words}} -- find the {category}.",
            f"Here are five words: {{words}}. Which one is {article} {category}?",
            f"Pick out the {category} from {{words}}.",
            f"List: {{words}}. {category.capitalize()}:",
        ),
        lambda f: f[category],
        choices=(lambda f: tuple(f["list"])) if kind == "multiple_choice" else None,
        instruction=f"Find the word that names {article} {category} in the given list and answer with that word.",
        query_instruction=f"Return the {category} mentioned among the words.",
        eval_templates=2,
    )


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        # Held-in, world "words": five tasks on the same word lists.
        _pick("animal", "generation", "an"),
        _pick("fruit", "multiple_choice", "a"),
        _pick("color", "generation", "a"),
        _pick("tool", "multiple_choice", "a"),
        _pick("vehicle", "generation", "a"),
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
        # Held-in, world "schedule": two questions about the same timetable entries.
        Task(
            "schedule_city",
            "schedule",
            "generation",
            (
                "{schedule} Where is it going?",
                "Read the timetable entry and name the destination: {schedule}",
                "{schedule} Destination:",
                "{schedule} Which city does it travel to?",
                "To which city does this departure go? {schedule}",
            ),
            lambda f: f["city"],
            instruction="Read the given timetable entry and answer with the city the vehicle travels to.",
            query_instruction="Name the destination of the departure.",
            eval_templates=2,
        ),
        Task(
            "schedule_platform",
            "schedule",
            "generation",
            (
                "{schedule} Which platform does it leave from?",
                "Read the timetable entry and give the platform number: {schedule}",
                "{schedule} Platform:",
                "{schedule} From what platform should I board?",
                "What is the departure platform? {schedule}",
            ),
            lambda f: f["platform"],
            instruction="Read the given timetable entry and answer with the number of the platform it leaves from.",
            query_instruction="Give the platform number of the departure.",
            eval_templates=2,
        ),
        # Held-out: held-in skills through new formats, paraphrases and compositions; no expert, no training.
        Task(
            "pick_creature",
            "words",
            "generation",
            (
                "Which of {words} is a living creature?",
                "{words} -- one of these is a beast. Which?",
                "Name the living being among {words}.",
            ),
            lambda f: f["animal"],
            query_instruction="Find the living creature in the list of words.",
            held_out=True,
            skills=("pick_animal",),
        ),
        Task(
            "fruit_and_color",
            "words",
            "multiple_choice",
            (
                "Which fruit and which color are in {words}? Answer as fruit, color.",
                "{words} -- give the fruit and then the color.",
                "From {words}, write the fruit followed by the color.",
            ),
            lambda f: f"{f['fruit']}, {f['color']}",
            choices=lambda f: tuple(f["pair_options"]),
            query_instruction="Write the fruit and then the color that appear in the list.",
            held_out=True,
            skills=("pick_fruit", "pick_color"),
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
