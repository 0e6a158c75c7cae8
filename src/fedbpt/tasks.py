"""Task registry: where each task's data lives, how its examples become a prompt, and its label words.

Templates use three kinds of slot: ``{prompt}`` (the L placeholder tokens that receive A z),
``{text0}``/``{text1}`` (the example's text fields, in ``text_fields`` order) and ``{mask}`` (the
answer position). Masked LMs use ``template`` (the public example's templates); causal LMs read the
answer at the last position, so their ``causal_template`` ends where the label word would follow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    hf_path: str
    hf_name: str | None
    text_fields: tuple[str, ...]
    verbalizer: tuple[str, ...]  # label i -> label word
    template: str
    causal_template: str
    label_sentences: tuple[str, ...]  # label i -> sentence, for sentence-encoder models
    label_field: str = "label"
    test_split: str = "test"  # GLUE test labels are hidden: the papers evaluate on validation
    metric: str = "acc"  # "acc" or "f1" (positive class = label 1)
    literal_newlines: bool = False  # the text holds "\n" as two characters (Yelp): read them as a space

    @property
    def num_labels(self) -> int:
        return len(self.verbalizer)


_SENTIMENT = dict(
    text_fields=("sentence",),
    verbalizer=("bad", "great"),
    template="{prompt} . {text0} . It was {mask} .",
    causal_template="{prompt} {text0} It was{mask}",
    label_sentences=("It was terrible.", "It was great."),
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(name="sst2", hf_path="nyu-mll/glue", hf_name="sst2", test_split="validation", **_SENTIMENT),
        Task(
            name="yelpp",
            hf_path="fancyzhx/yelp_polarity",
            hf_name=None,
            literal_newlines=True,
            **{**_SENTIMENT, "text_fields": ("text",)},
        ),
        Task(
            name="agnews",
            hf_path="fancyzhx/ag_news",
            hf_name=None,
            text_fields=("text",),
            verbalizer=("World", "Sports", "Business", "Tech"),
            template="{prompt} . {mask} News: {text0}",
            causal_template="{prompt} {text0} This news is about{mask}",
            label_sentences=(
                "This is world news.",
                "This is sports news.",
                "This is business news.",
                "This is technology news.",
            ),
        ),
        Task(
            name="dbpedia",
            hf_path="fancyzhx/dbpedia_14",
            hf_name=None,
            text_fields=("content",),
            verbalizer=(
                "Company",
                "Education",
                "Artist",
                "Athlete",
                "Office",
                "Transportation",
                "Building",
                "Natural",
                "Village",
                "Animal",
                "Plant",
                "Album",
                "Film",
                "Written",
            ),  # fmt: skip
            template="{prompt} [ Category: {mask} ] {text0}",
            causal_template="{prompt} {text0} Category:{mask}",
            label_sentences=tuple(
                f"This is about {w}."
                for w in (
                    "a company",
                    "an educational institution",
                    "an artist",
                    "an athlete",
                    "an office holder",
                    "transportation",
                    "a building",
                    "a natural place",
                    "a village",
                    "an animal",
                    "a plant",
                    "an album",
                    "a film",
                    "a written work",
                )
            ),  # fmt: skip
        ),
        Task(
            name="mrpc",
            hf_path="nyu-mll/glue",
            hf_name="mrpc",
            text_fields=("sentence1", "sentence2"),
            verbalizer=("No", "Yes"),
            template="{prompt} . {text0} ? {mask} , {text1}",
            causal_template="{prompt} {text0} {text1} Do these two sentences mean the same?{mask}",
            label_sentences=("The two sentences differ.", "The two sentences mean the same."),
            test_split="validation",
            metric="f1",
        ),
        Task(
            name="rte",
            hf_path="nyu-mll/glue",
            hf_name="rte",
            text_fields=("sentence1", "sentence2"),
            verbalizer=("Yes", "No"),  # GLUE RTE: 0 = entailment
            template="{prompt} . {text0} ? {mask} , {text1}",
            causal_template="{prompt} {text0} Question: {text1} True or false? Answer:{mask}",
            label_sentences=("The second sentence follows.", "The second sentence does not follow."),
            test_split="validation",
        ),
        Task(
            name="snli",
            hf_path="stanfordnlp/snli",
            hf_name=None,
            text_fields=("premise", "hypothesis"),
            verbalizer=("Yes", "Maybe", "No"),
            template="{prompt} . {text0} ? {mask} , {text1}",
            causal_template="{prompt} {text0} Question: {text1} Yes, maybe or no? Answer:{mask}",
            label_sentences=("That is true.", "That may be true.", "That is false."),
        ),
    ]
}


def get_task(name: str) -> Task:
    """The task called ``name``; a clear error names ``--task_name`` and the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown --task_name {name!r}; choose one of: {', '.join(TASKS)}") from None
