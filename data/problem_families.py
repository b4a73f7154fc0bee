"""The 25 families of grade-school word problems behind the demo's synthetic math data.

Not needed to learn EntroDrop: this module only generates the CPU demo's scarce domain corpus
(data/embedded.py turns its draws into problems, splits and token files), and nothing of the
method depends on it. Each family is a function of a random.Random that returns (question,
steps, answer); FAMILIES names them in a fixed order and FAMILY_GENERATORS maps each name to
its function. Reorder, rename or redraw nothing here without need: the demo's data, and every
number the demo reports, follow from the exact sequence of draws (tests/test_embedded.py pins
it with a checksum).
"""

from __future__ import annotations

import random
from typing import Callable


# ---------------------------------------------------------------------------
# Exact calculations and phrasings
# ---------------------------------------------------------------------------


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    """Return ("a op b = c", c).

    Raises if the result is not a positive integer, so a template that samples
    numbers carelessly fails loudly instead of emitting a wrong solution.
    """
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not an exact integer division")
        c = a // b
    else:
        raise ValueError(f"unknown operator {op!r}")
    if c <= 0:
        raise ValueError(f"{a} {op} {b} = {c} is not a positive integer")
    return f"{a} {op} {b} = {c}", c


def _divisors(n: int, low: int, high: int) -> list[int]:
    """Divisors of n between low and high inclusive, ascending."""
    return [d for d in range(low, high + 1) if n % d == 0]


def _fill(rng: random.Random, templates: tuple[str, ...], **fields: object) -> str:
    """Pick one phrasing and fill it in."""
    return rng.choice(templates).format(**fields)


# ---------------------------------------------------------------------------
# People, things and places the templates draw from
# ---------------------------------------------------------------------------

_FEMALE_NAMES = (
    "Aisha", "Maria", "Sofia", "Emma", "Priya", "Mei", "Fatima", "Olivia",
    "Hana", "Lucia", "Zoe", "Amara", "Ingrid", "Yuki", "Nadia", "Chloe",
    "Elena", "Grace", "Leila", "Rosa", "Ava", "Ife", "Sara", "Nora",
    "Camila", "Anya", "Keiko", "Maya", "Isabel", "Dana",
)
_MALE_NAMES = (
    "Ben", "Omar", "Lucas", "Mateo", "Raj", "Kenji", "Samuel", "Ahmed",
    "Leo", "Diego", "Noah", "Tariq", "Ivan", "Kwame", "Liam", "Hugo",
    "Felix", "Arjun", "Marco", "Jamal", "Tom", "Daniel", "Ethan", "Pablo",
    "Yusuf", "Oscar", "Chen", "Eli", "Max", "Victor",
)


def _person(rng: random.Random) -> dict[str, str]:
    """A random name with its pronouns, ready to fill a template's fields."""
    if rng.random() < 0.5:
        name, he, his, him, himself = rng.choice(_FEMALE_NAMES), "she", "her", "her", "herself"
    else:
        name, he, his, him, himself = rng.choice(_MALE_NAMES), "he", "his", "him", "himself"
    return {
        "name": name, "he": he, "He": he.capitalize(), "his": his,
        "His": his.capitalize(), "him": him, "himself": himself,
    }


def _other_names(rng: random.Random, person: dict[str, str], count: int) -> list[str]:
    """Names of further people in a problem, all different from each other and from person."""
    others = [n for n in _FEMALE_NAMES + _MALE_NAMES if n != person["name"]]
    return rng.sample(others, count)


_STORE_ITEMS = (
    "notebooks", "pencil cases", "comic books", "sandwiches", "toy cars",
    "bottles of juice", "bags of chips", "boxes of crayons", "rulers",
    "greeting cards", "yo-yos", "packs of gum",
)
_GOODS = (
    "apples", "oranges", "pencils", "erasers", "muffins", "candles",
    "notebooks", "bars of soap", "light bulbs", "batteries", "cupcakes",
    "tennis balls", "lemons", "postcards",
)
_SMALL_THINGS = (
    "stickers", "cookies", "crayons", "marbles", "candies", "balloons",
    "trading cards", "beads", "stamps", "seashells", "pebbles", "buttons",
)
_CONTAINERS = ("packs", "boxes", "bags")
_SALE_ITEMS = (
    "jacket", "lamp", "backpack", "board game", "pair of shoes", "watch",
    "chair", "blender", "scooter", "sweater", "suitcase", "tent",
)
_SAVING_GOALS = (
    "bike", "skateboard", "guitar", "video game", "tent", "camera",
    "telescope", "pair of skates", "keyboard", "drone", "fish tank",
)
_FRUITS = ("apples", "oranges", "pears", "plums", "peaches", "lemons", "mangoes", "apricots")
_CROPS = (  # (plants, what each plant yields)
    ("tomato plants", "tomatoes"), ("pepper plants", "peppers"),
    ("bean plants", "beans"), ("strawberry plants", "strawberries"),
    ("apple trees", "apples"), ("cucumber plants", "cucumbers"),
    ("sunflowers", "seeds"),
)
_PACKABLE = (
    "books", "jars of honey", "mugs", "cans of paint", "toy robots",
    "candles", "plates", "bottles of oil", "pairs of boots",
)
_VENUES = ("zoo", "museum", "aquarium", "circus", "planetarium", "science fair", "water park")
_SHOWS = ("concert", "school play", "puppet show", "talent show", "magic show", "dance recital")
_JOBS = (
    "at the bakery", "walking dogs", "babysitting", "at the library",
    "tutoring math", "at a cafe", "washing cars", "at the garden center",
)
_CONTAINERS_OF_WATER = ("tank", "pool", "fish tank", "barrel", "bathtub", "pond")
_BOOKS = (
    "novel", "comic book", "history book", "mystery novel", "book about space", "cookbook",
    "biography",
)
_ACTIVITIES = (
    "practices the piano", "swims", "reads", "studies Spanish", "jogs",
    "paints", "practices the violin", "plays chess", "rides {his} bike",
)


# ---------------------------------------------------------------------------
# Problem families
#
# Each family returns (question, steps, answer). Numbers are sampled so that
# every division is exact and every result positive; _calc checks both.
# Several phrasings and step counts per family keep the model from matching
# a single template.
# ---------------------------------------------------------------------------

_Drawn = tuple[str, list[str], int]  # what a family returns: (question, steps, answer)


def _shopping_change(rng: random.Random) -> _Drawn:
    p = _person(rng)
    if rng.random() < 0.5:
        items = rng.choice(_STORE_ITEMS)
        n = rng.randint(2, 9)
        price = rng.randint(2, min(15, 95 // n))
        cost_calc, cost = _calc(n, "*", price)
        bill = min(b for b in (20, 50, 100) if b >= cost + 2)
        question = _fill(rng, (
            "{name} buys {n} {items} that cost {price} dollars each and pays with a {bill}-dollar "
            "bill. How much change does {he} get?",
            "At the shop, {name} picks {n} {items} priced at {price} dollars apiece. "
            "{He} hands the cashier {bill} dollars. How many dollars of change does {he} receive?",
            "{name} has a {bill}-dollar bill and wants {n} {items}. "
            "Each one costs {price} dollars. How much money will {he} have left after paying?",
        ), n=n, items=items, price=price, bill=bill, **p)
        steps = [rng.choice((f"The {items} cost {cost_calc} dollars.",
                             f"{p['name']} pays {cost_calc} dollars for the {items}."))]
    else:
        items1, items2 = rng.sample(_STORE_ITEMS, 2)
        n1, n2 = rng.randint(2, 6), rng.randint(2, 6)
        price1, price2 = rng.randint(2, 8), rng.randint(2, 8)
        calc1, cost1 = _calc(n1, "*", price1)
        calc2, cost2 = _calc(n2, "*", price2)
        total_calc, cost = _calc(cost1, "+", cost2)
        bill = min(b for b in (20, 50, 100) if b >= cost + 2)
        question = _fill(rng, (
            "{name} buys {n1} {items1} at {price1} dollars each and {n2} {items2} at {price2} "
            "dollars each. {He} pays with a {bill}-dollar bill. How much change does {he} get?",
            "{name} pays for {n1} {items1} and {n2} {items2} with a {bill}-dollar bill. "
            "The {items1} cost {price1} dollars each and the {items2} cost {price2} dollars each. "
            "How many dollars does {he} get back?",
        ), n1=n1, items1=items1, price1=price1, n2=n2, items2=items2, price2=price2, bill=bill, **p)
        steps = [
            f"The {items1} cost {calc1} dollars.",
            f"The {items2} cost {calc2} dollars.",
            f"Together that is {total_calc} dollars.",
        ]
    change_calc, change = _calc(bill, "-", cost)
    steps.append(rng.choice((f"{p['He']} gets {change_calc} dollars back.",
                             f"The change is {change_calc} dollars.")))
    return question, steps, change


def _sharing_equally(rng: random.Random) -> _Drawn:
    p = _person(rng)
    things, box = rng.choice(_SMALL_THINGS), rng.choice(_CONTAINERS)
    packs, per_pack = rng.randint(2, 8), rng.choice((4, 5, 6, 8, 10, 12))
    total_calc, total = _calc(packs, "*", per_pack)
    steps = [rng.choice((f"{p['He']} has {total_calc} {things} in total.",
                         f"In all there are {total_calc} {things}."))]
    if rng.random() < 0.5:
        friends = rng.choice(_divisors(total, 2, min(9, total // 2)))
        question = _fill(rng, (
            "{name} has {packs} {box} of {things} with {per_pack} {things} in each. {He} shares "
            "them equally among {friends} friends. How many {things} does each friend get?",
            "There are {per_pack} {things} in each of {name}'s {packs} {box}. If {he} splits all "
            "of them evenly between {friends} friends, how many does each friend get?",
            "{name} buys {packs} {box} of {things}, and every one holds {per_pack} {things}. "
            "{He} hands them out equally to {friends} friends. "
            "How many {things} does each friend receive?",
        ), packs=packs, box=box, things=things, per_pack=per_pack, friends=friends, **p)
        to_share = total
    else:
        friends = rng.randint(2, min(6, total // 3))  # leaves at least two each
        kept = total % friends or friends  # what is left over, but never 0 or 1
        if kept == 1:
            kept += friends
        question = _fill(rng, (
            "{name} has {packs} {box} of {things} with {per_pack} in each. "
            "{He} keeps {kept} for {himself} and shares the rest equally among {friends} friends. "
            "How many {things} does each friend get?",
            "{name} opens {packs} {box} of {things}; each holds {per_pack}. "
            "After setting aside {kept} {things} for {himself}, {he} divides the others evenly "
            "among {friends} friends. How many does each friend get?",
        ), packs=packs, box=box, things=things, per_pack=per_pack, kept=kept, friends=friends, **p)
        rest_calc, to_share = _calc(total, "-", kept)
        steps.append(f"That leaves {rest_calc} {things} to share.")
    each_calc, each = _calc(to_share, "/", friends)
    steps.append(rng.choice((f"Each friend gets {each_calc} {things}.",
                             f"So each of them receives {each_calc} {things}.")))
    return question, steps, each


def _travel(rng: random.Random) -> _Drawn:
    p = _person(rng)
    verb, low, high = rng.choice((("drives", 30, 70), ("cycles", 8, 20), ("walks", 3, 5),
                                  ("jogs", 5, 8), ("rows", 3, 6)))
    unit = rng.choice(("miles", "kilometers"))
    speed, hours = rng.randint(low, high), rng.randint(2, 5)
    kind = rng.randrange(3)
    if kind == 0:
        speed2, hours2 = rng.randint(low, high), rng.randint(2, 4)
        question = _fill(rng, (
            "{name} {verb} at {speed} {unit} per hour for {hours} hours, then at {speed2} {unit} "
            "per hour for {hours2} hours. How many {unit} does {he} cover in total?",
            "For the first {hours} hours of a trip, {name} {verb} at {speed} {unit} an hour. "
            "For the next {hours2} hours {he} keeps a pace of {speed2} {unit} an hour. "
            "How far does {he} go altogether?",
        ), verb=verb, speed=speed, unit=unit, hours=hours, speed2=speed2, hours2=hours2, **p)
        calc1, leg1 = _calc(speed, "*", hours)
        calc2, leg2 = _calc(speed2, "*", hours2)
        total_calc, total = _calc(leg1, "+", leg2)
        steps = [
            f"The first part is {calc1} {unit}.",
            f"The second part is {calc2} {unit}.",
            f"In total {p['he']} covers {total_calc} {unit}.",
        ]
        return question, steps, total
    if kind == 1:
        covered_calc, covered = _calc(speed, "*", hours)
        trip = covered + rng.randint(2, 60)
        question = _fill(rng, (
            "{name} has to travel {trip} {unit}. {He} {verb} at {speed} {unit} per hour for "
            "{hours} hours. How many {unit} are still left?",
            "A trip is {trip} {unit} long. {name} {verb} for {hours} hours at {speed} {unit} per "
            "hour. How much farther does {he} have to go?",
        ), trip=trip, unit=unit, verb=verb, speed=speed, hours=hours, **p)
        left_calc, left = _calc(trip, "-", covered)
        steps = [f"{p['He']} has covered {covered_calc} {unit}.",
                 f"There are {left_calc} {unit} left."]
        return question, steps, left
    trip = speed * hours
    rest = rng.randint(2, 3)
    question = _fill(rng, (
        "{name} {verb} {trip} {unit} at a steady {speed} {unit} per hour and then rests for {rest} "
        "hours. How many hours does the whole outing take?",
        "It takes {name} some time to cover {trip} {unit}, since {he} {verb} at {speed} {unit} an "
        "hour. Afterwards {he} takes a {rest}-hour break. How many hours is that in all?",
    ), verb=verb, trip=trip, unit=unit, speed=speed, rest=rest, **p)
    moving_calc, moving = _calc(trip, "/", speed)
    total_calc, total = _calc(moving, "+", rest)
    steps = [f"Moving takes {moving_calc} hours.", f"With the rest it takes {total_calc} hours."]
    return question, steps, total


def _ages(rng: random.Random) -> _Drawn:
    p = _person(rng)
    older, younger = _other_names(rng, p, 2)
    age, times = rng.randint(4, 15), rng.randint(2, 4)
    gap = rng.randint(2, min(20, age * times - 2))
    facts = _fill(rng, (
        "{name} is {age} years old. {older} is {times} times as old as {name}, and {younger} is "
        "{gap} years younger than {older}.",
        "{older}'s age is {times} times {name}'s age, and {name} is {age}. "
        "{younger} was born {gap} years after {older}.",
    ), age=age, older=older, times=times, younger=younger, gap=gap, **p)
    older_calc, older_age = _calc(age, "*", times)
    younger_calc, younger_age = _calc(older_age, "-", gap)
    steps = [f"{older} is {older_calc} years old.", f"{younger} is {younger_calc} years old."]
    kind = rng.randrange(3)
    if kind == 0:
        return f"{facts} How old is {younger}?", steps, younger_age
    if kind == 1:
        years = rng.randint(2, 10)
        future_calc, future = _calc(younger_age, "+", years)
        steps.append(f"In {years} years {younger} will be {future_calc} years old.")
        return f"{facts} How old will {younger} be in {years} years?", steps, future
    pair_calc, pair = _calc(age, "+", older_age)
    sum_calc, total = _calc(pair, "+", younger_age)
    steps += [f"{p['name']} and {older} together are {pair_calc} years old.",
              f"Adding {younger} gives {sum_calc} years."]
    return f"{facts} What is the sum of their three ages?", steps, total


def _area_perimeter(rng: random.Random) -> _Drawn:
    p = _person(rng)
    place = rng.choice(("garden", "yard", "playground", "field", "patio", "vegetable plot"))
    units, unit = rng.choice((("meters", "meter"), ("feet", "foot")))
    kind = rng.randrange(3)
    if kind == 0:
        length = rng.randint(6, 30)
        width, price = rng.randint(3, length - 1), rng.randint(2, 8)
        question = _fill(rng, (
            "A rectangular {place} is {length} {units} long and {width} {units} wide. "
            "{name} wants to put a fence around it, and fencing costs {price} dollars per {unit}. "
            "How much will the fence cost?",
            "{name} is fencing a rectangular {place} that measures {length} {units} "
            "by {width} {units}. The fence costs {price} dollars for each {unit}. "
            "What is the total cost of the fence?",
        ), place=place, length=length, width=width, units=units, unit=unit, price=price, **p)
        half_calc, half = _calc(length, "+", width)
        whole_calc, perimeter = _calc(half, "*", 2)
        cost_calc, cost = _calc(perimeter, "*", price)
        steps = [
            f"One length and one width make {half_calc} {units}.",
            f"The perimeter is {whole_calc} {units}.",
            f"The fence costs {cost_calc} dollars.",
        ]
        return question, steps, cost
    if kind == 1:
        length, width, price = rng.randint(3, 15), rng.randint(2, 12), rng.randint(2, 5)
        question = _fill(rng, (
            "A rectangular {place} is {length} {units} long and {width} {units} wide. "
            "{name} covers it with grass seed that costs {price} dollars per square {unit}. "
            "How much does the seed cost?",
            "{name} wants to cover a rectangular {place} that is {length} by {width} {units} with "
            "tiles. Tiles cost {price} dollars for every square {unit}. How much will {he} spend?",
        ), place=place, length=length, width=width, units=units, unit=unit, price=price, **p)
        area_calc, area = _calc(length, "*", width)
        cost_calc, cost = _calc(area, "*", price)
        steps = [f"The area is {area_calc} square {units}.",
                 f"Covering it costs {cost_calc} dollars."]
        return question, steps, cost
    l1, w1, l2, w2 = rng.randint(3, 14), rng.randint(2, 12), rng.randint(3, 14), rng.randint(2, 12)
    question = _fill(rng, (
        "{name}'s house has two rectangular rooms. "
        "One is {l1} by {w1} {units} and the other is {l2} by {w2} {units}. "
        "How many square {units} of carpet does {he} need to cover both floors?",
        "{name} paints two rectangular walls, one {l1} {units} by {w1} {units} and one {l2} "
        "{units} by {w2} {units}. What is the total area {he} paints, in square {units}?",
    ), l1=l1, w1=w1, l2=l2, w2=w2, units=units, **p)
    calc1, area1 = _calc(l1, "*", w1)
    calc2, area2 = _calc(l2, "*", w2)
    total_calc, total = _calc(area1, "+", area2)
    steps = [
        f"The first one is {calc1} square {units}.",
        f"The second one is {calc2} square {units}.",
        f"Together they are {total_calc} square {units}.",
    ]
    return question, steps, total


def _unit_price(rng: random.Random) -> _Drawn:
    p = _person(rng)
    goods = rng.choice(_GOODS)
    pack, each = rng.randint(2, 12), rng.randint(2, 9)
    price = pack * each
    wanted = rng.choice([m for m in range(2, 16) if m != pack])
    unit_calc, _ = _calc(price, "/", pack)
    cost_calc, cost = _calc(each, "*", wanted)
    steps = [
        rng.choice((f"Each one costs {unit_calc} dollars.",
                    f"One of them costs {unit_calc} dollars.")),
        rng.choice((f"So {wanted} of them cost {cost_calc} dollars.",
                    f"{wanted} {goods} cost {cost_calc} dollars.")),
    ]
    if cost <= 98 and rng.random() < 0.4:
        bill = min(b for b in (20, 50, 100) if b >= cost + 2)
        question = _fill(rng, (
            "{pack} {goods} cost {price} dollars. {name} buys {wanted} {goods} at the same price "
            "each and pays with a {bill}-dollar bill. How much change does {he} get?",
            "A bag of {pack} {goods} sells for {price} dollars. {name} wants {wanted} {goods} at "
            "that price per item and hands over {bill} dollars. How many dollars come back?",
        ), pack=pack, goods=goods, price=price, wanted=wanted, bill=bill, **p)
        change_calc, change = _calc(bill, "-", cost)
        steps.append(f"The change is {change_calc} dollars.")
        return question, steps, change
    question = _fill(rng, (
        "A pack of {pack} {goods} costs {price} dollars. "
        "How much would {wanted} {goods} cost at the same price for each one?",
        "{name} sees that {pack} {goods} sell for {price} dollars. "
        "{He} wants to buy {wanted} of them at that price each. How many dollars will {he} pay?",
        "At the market, {price} dollars buys {pack} {goods}. "
        "At that rate, what do {wanted} {goods} cost {name}?",
    ), pack=pack, goods=goods, price=price, wanted=wanted, **p)
    return question, steps, cost


def _saving_weekly(rng: random.Random) -> _Drawn:
    p = _person(rng)
    goal_item = rng.choice(_SAVING_GOALS)
    weekly, weeks, start = rng.randint(3, 25), rng.randint(3, 12), rng.randint(5, 60)
    kind = rng.randrange(3)
    if kind == 2:
        goal = start + weekly * weeks
        question = _fill(rng, (
            "{name} is saving for a {goal_item} that costs {goal} dollars. "
            "{He} has {start} dollars now and puts aside {weekly} dollars each week. "
            "How many weeks until {he} can buy it?",
            "A {goal_item} costs {goal} dollars. {name} already has {start} dollars and saves "
            "{weekly} dollars a week. After how many weeks will {he} have exactly enough?",
        ), goal_item=goal_item, goal=goal, start=start, weekly=weekly, **p)
        need_calc, need = _calc(goal, "-", start)
        weeks_calc, weeks_needed = _calc(need, "/", weekly)
        steps = [f"{p['He']} still needs {need_calc} dollars.", f"That takes {weeks_calc} weeks."]
        return question, steps, weeks_needed
    saved_calc, saved = _calc(weekly, "*", weeks)
    total_calc, total = _calc(saved, "+", start)
    steps = [
        rng.choice((f"In {weeks} weeks {p['he']} saves {saved_calc} dollars.",
                    f"{p['He']} puts away {saved_calc} dollars.")),
        f"Then {p['he']} has {total_calc} dollars.",
    ]
    if kind == 0:
        question = _fill(rng, (
            "{name} has {start} dollars and saves {weekly} dollars every week. "
            "How much money will {he} have after {weeks} weeks?",
            "{name} starts with {start} dollars in a jar. Each week {he} adds {weekly} dollars. "
            "How many dollars are in the jar after {weeks} weeks?",
        ), start=start, weekly=weekly, weeks=weeks, **p)
        return question, steps, total
    goal = total + rng.randint(5, 50)
    question = _fill(rng, (
        "{name} wants a {goal_item} that costs {goal} dollars. {He} already has {start} dollars "
        "and saves {weekly} dollars a week for {weeks} weeks. How much more money does {he} need?",
        "A {goal_item} sells for {goal} dollars. {name} has {start} dollars, then saves {weekly} "
        "dollars every week for {weeks} weeks. How many dollars is {he} still short?",
    ), goal_item=goal_item, goal=goal, start=start, weekly=weekly, weeks=weeks, **p)
    short_calc, short = _calc(goal, "-", total)
    steps.append(f"{p['He']} still needs {short_calc} dollars.")
    return question, steps, short


def _percent_discount(rng: random.Random) -> _Drawn:
    p = _person(rng)
    item = rng.choice(_SALE_ITEMS)
    # Work through a simple fraction of the price (a tenth, a quarter or a half)
    # rather than price * percent / 100, which keeps every number small.
    percent, part, part_words = rng.choice((
        (10, 10, "Ten percent"), (20, 10, "Ten percent"), (30, 10, "Ten percent"),
        (40, 10, "Ten percent"),
        (25, 4, "A quarter"), (75, 4, "A quarter"), (50, 2, "Half"),
    ))
    price = part * rng.randint(max(2, 12 // part), 150 // part)
    part_calc, part_value = _calc(price, "/", part)
    steps = [f"{part_words} of {price} dollars is {part_calc} dollars."]
    parts = percent * part // 100
    if parts == 1:
        off = part_value
    else:
        off_calc, off = _calc(part_value, "*", parts)
        steps.append(rng.choice((f"So {percent} percent is {off_calc} dollars.",
                                 f"The discount is {off_calc} dollars.")))
    kind = rng.randrange(3)
    if kind == 2:
        count = rng.randint(2, 5)
        question = _fill(rng, (
            "{name} buys {count} of the same {item}, each normally {price} dollars, during a "
            "{percent}% off sale. How many dollars does {he} save in total?",
            "A {item} is usually {price} dollars. The store offers {percent} percent off, and "
            "{name} buys {count} of them. How much money does the discount save {him}?",
        ), count=count, item=item, price=price, percent=percent, **p)
        saved_calc, saved = _calc(off, "*", count)
        steps.append(f"On {count} of them {p['he']} saves {saved_calc} dollars.")
        return question, steps, saved
    sale_calc, sale = _calc(price, "-", off)
    steps.append(f"The sale price is {sale_calc} dollars.")
    if kind == 0:
        question = _fill(rng, (
            "A {item} costs {price} dollars, and the store takes {percent}% off. "
            "How much does {name} pay for it on sale?",
            "{name} wants a {item} priced at {price} dollars. "
            "It is on sale for {percent} percent off. What is the sale price?",
        ), item=item, price=price, percent=percent, **p)
        return question, steps, sale
    count = rng.randint(2, 4)
    question = _fill(rng, (
        "{name} buys {count} of the same {item} at {percent}% off. "
        "Each one normally costs {price} dollars. How much does {he} pay in total?",
        "A {item} is marked at {price} dollars with a {percent} percent discount. "
        "How much do {count} of them cost {name}?",
    ), count=count, item=item, price=price, percent=percent, **p)
    total_calc, total = _calc(sale, "*", count)
    steps.append(f"For {count} of them {p['he']} pays {total_calc} dollars.")
    return question, steps, total


def _recipe_scaling(rng: random.Random) -> _Drawn:
    p = _person(rng)
    dish = rng.choice(("pancakes", "muffins", "cookies", "bread rolls", "servings of soup",
                       "waffles", "dumplings"))
    serves, batches = rng.randint(2, 6), rng.randint(2, 5)
    wanted = serves * batches
    batches_calc, _ = _calc(wanted, "/", serves)
    steps = [rng.choice((f"{p['He']} needs {batches_calc} batches.",
                         f"That is {batches_calc} times the recipe."))]
    kind = rng.randrange(3)
    if kind == 1:
        first, second = rng.sample(("flour", "sugar", "milk", "oats"), 2)
        q1, q2 = rng.randint(2, 6), rng.randint(2, 6)
        question = _fill(rng, (
            "A recipe for {serves} {dish} uses {q1} cups of {first} and {q2} cups of {second}. "
            "{name} wants to make {wanted} {dish}. "
            "How many cups of {first} and {second} does {he} need altogether?",
            "To make {serves} {dish}, {name} mixes {q1} cups of {first} with {q2} cups of "
            "{second}. How many cups of the two together will {he} use for {wanted} {dish}?",
        ), serves=serves, dish=dish, q1=q1, first=first, q2=q2, second=second, wanted=wanted, **p)
        calc1, amount1 = _calc(batches, "*", q1)
        calc2, amount2 = _calc(batches, "*", q2)
        total_calc, total = _calc(amount1, "+", amount2)
        steps += [
            f"{p['He']} needs {calc1} cups of {first}.",
            f"{p['He']} needs {calc2} cups of {second}.",
            f"Altogether that is {total_calc} cups.",
        ]
        return question, steps, total
    ingredient, low, high = rng.choice((("eggs", 2, 4), ("cups of flour", 2, 6),
                                        ("spoons of sugar", 2, 8), ("cups of milk", 2, 4),
                                        ("grams of butter", 20, 90)))
    amount = rng.randint(low, high)
    needed_calc, needed = _calc(batches, "*", amount)
    steps.append(f"That takes {needed_calc} {ingredient}.")
    if kind == 0:
        question = _fill(rng, (
            "A recipe for {serves} {dish} uses {amount} {ingredient}. "
            "{name} wants to make {wanted} {dish}. How many {ingredient} does {he} need?",
            "{name}'s recipe makes {serves} {dish} with {amount} {ingredient}. "
            "How many {ingredient} are needed for {wanted} {dish}?",
        ), serves=serves, dish=dish, amount=amount, ingredient=ingredient, wanted=wanted, **p)
        return question, steps, needed
    have = rng.randint(2, needed - 1)
    question = _fill(rng, (
        "A recipe for {serves} {dish} uses {amount} {ingredient}. {name} wants {wanted} {dish} but "
        "has only {have} {ingredient}. How many more {ingredient} does {he} need?",
        "{name} plans to make {wanted} {dish}. The recipe needs {amount} {ingredient} for every "
        "{serves} {dish}, and {he} has {have} {ingredient} at home. How many more must {he} get?",
    ), serves=serves, dish=dish, amount=amount, ingredient=ingredient, wanted=wanted,
       have=have, **p)
    missing_calc, missing = _calc(needed, "-", have)
    steps.append(f"{p['He']} must get {missing_calc} more.")
    return question, steps, missing


def _multi_step_buying(rng: random.Random) -> _Drawn:
    p = _person(rng)
    if rng.random() < 0.35:
        gift1, gift2 = rng.sample(_GOODS, 2)
        price1, price2, friends = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 9)
        question = _fill(rng, (
            "{name} buys a small gift bag for each of {friends} friends. "
            "Each bag gets one of the {gift1}, which cost {price1} dollars each, and one of the "
            "{gift2}, which cost {price2} dollars each. How much does {he} spend?",
            "For a party, {name} prepares {friends} gift bags. Every bag holds a pack "
            "of {gift1} for {price1} dollars and a pack of {gift2} for {price2} dollars. "
            "What do all the bags cost?",
        ), friends=friends, gift1=gift1, price1=price1, gift2=gift2, price2=price2, **p)
        bag_calc, bag = _calc(price1, "+", price2)
        total_calc, total = _calc(bag, "*", friends)
        steps = [f"One bag costs {bag_calc} dollars.", f"All the bags cost {total_calc} dollars."]
        return question, steps, total
    (goods1, low1, high1), (goods2, low2, high2) = rng.sample((
        ("bags of rice", 3, 9), ("bottles of oil", 4, 9), ("loaves of bread", 2, 5),
        ("cartons of milk", 2, 4), ("kilograms of beans", 2, 6), ("jars of jam", 3, 7),
    ), 2)
    n1, n2 = rng.randint(2, 6), rng.randint(2, 6)
    price1, price2 = rng.randint(low1, high1), rng.randint(low2, high2)
    calc1, cost1 = _calc(n1, "*", price1)
    calc2, cost2 = _calc(n2, "*", price2)
    sum_calc, total = _calc(cost1, "+", cost2)
    steps = [f"The {goods1} cost {calc1} dollars.", f"The {goods2} cost {calc2} dollars.",
             f"That makes {sum_calc} dollars."]
    kind = rng.randrange(3)
    if kind == 0:
        question = _fill(rng, (
            "{name} buys {n1} {goods1} for {price1} dollars each and {n2} {goods2} for {price2} "
            "dollars each. How much does {he} spend?",
            "At the grocery store {name} gets {n1} {goods1} at {price1} dollars apiece and {n2} "
            "{goods2} at {price2} dollars apiece. What is the bill?",
        ), n1=n1, goods1=goods1, price1=price1, n2=n2, goods2=goods2, price2=price2, **p)
        return question, steps, total
    if kind == 1:
        fee = rng.randint(2, 9)
        question = _fill(rng, (
            "{name} orders {n1} {goods1} at {price1} dollars each and {n2} {goods2} at {price2} "
            "dollars each, plus a delivery fee of {fee} dollars. What is the total?",
            "An online order has {n1} {goods1} costing {price1} dollars each and {n2} {goods2} "
            "costing {price2} dollars each. Delivery adds {fee} dollars. How much does {name} pay?",
        ), n1=n1, goods1=goods1, price1=price1, n2=n2, goods2=goods2, price2=price2, fee=fee, **p)
        fee_calc, paid = _calc(total, "+", fee)
        steps.append(f"With delivery it comes to {fee_calc} dollars.")
        return question, steps, paid
    budget = total + rng.randint(2, 40)
    question = _fill(rng, (
        "{name} takes {budget} dollars to the market. {He} buys {n1} {goods1} at {price1} dollars "
        "each and {n2} {goods2} at {price2} dollars each. How much money does {he} have left?",
        "With {budget} dollars in {his} wallet, {name} buys {n1} {goods1} for {price1} dollars "
        "each and {n2} {goods2} for {price2} dollars each. How many dollars remain?",
    ), budget=budget, n1=n1, goods1=goods1, price1=price1, n2=n2, goods2=goods2, price2=price2, **p)
    left_calc, left = _calc(budget, "-", total)
    steps.append(f"{p['He']} has {left_calc} dollars left.")
    return question, steps, left


def _giving_away(rng: random.Random) -> _Drawn:
    p = _person(rng)
    things = rng.choice(_SMALL_THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        friend1, friend2 = _other_names(rng, p, 2)
        given1, given2 = rng.randint(2, 25), rng.randint(2, 25)
        start = given1 + given2 + rng.randint(2, 50)
        question = _fill(rng, (
            "{name} has {start} {things}. {He} gives {given1} to {friend1} and {given2} to "
            "{friend2}. How many {things} does {he} have left?",
            "{name} collected {start} {things}. {friend1} gets {given1} of them and {friend2} gets "
            "{given2}. How many does {name} keep?",
        ), start=start, things=things, given1=given1, friend1=friend1, given2=given2,
           friend2=friend2, **p)
        given_calc, given = _calc(given1, "+", given2)
        left_calc, left = _calc(start, "-", given)
        steps = [f"{p['He']} gives away {given_calc} {things}.",
                 f"{p['He']} has {left_calc} {things} left."]
        return question, steps, left
    if kind == 1:
        given, found = rng.randint(2, 30), rng.randint(2, 30)
        start = given + rng.randint(2, 60)
        question = _fill(rng, (
            "{name} has {start} {things}. {He} gives away {given} and later finds {found} more. "
            "How many {things} does {he} have now?",
            "{name} starts the day with {start} {things}, trades away {given} of them, and then "
            "gets {found} new ones. How many {things} does {he} end up with?",
        ), start=start, things=things, given=given, found=found, **p)
        after_calc, after = _calc(start, "-", given)
        now_calc, now = _calc(after, "+", found)
        steps = [f"After giving some away {p['he']} has {after_calc}.",
                 f"Now {p['he']} has {now_calc} {things}."]
        return question, steps, now
    each, friends, gift = rng.randint(2, 9), rng.randint(2, 6), rng.randint(2, 20)
    start = each * friends + rng.randint(1, 40)
    sibling = rng.choice(("brother", "sister", "cousin", "aunt", "grandmother"))
    question = _fill(rng, (
        "{name} has {start} {things}. {He} gives {each} to each of {friends} friends, and then "
        "{his} {sibling} gives {him} {gift} more. How many {things} does {name} have now?",
        "{name} owns {start} {things}. {friends} friends each receive {each} of them. "
        "Later {name}'s {sibling} adds {gift} {things}. How many are there now?",
    ), start=start, things=things, each=each, friends=friends, sibling=sibling, gift=gift, **p)
    given_calc, given = _calc(each, "*", friends)
    left_calc, left = _calc(start, "-", given)
    now_calc, now = _calc(left, "+", gift)
    steps = [f"{p['He']} gives away {given_calc} {things}.", f"That leaves {left_calc}.",
             f"After the gift {p['he']} has {now_calc} {things}."]
    return question, steps, now


def _time_minutes(rng: random.Random) -> _Drawn:
    p = _person(rng)
    kind = rng.randrange(3)
    if kind == 0:
        minutes = rng.choice((20, 30, 40, 45, 60, 75, 90))
        # Whole hours, and at least two of them.
        days = rng.choice([d for d in range(2, 8) if minutes * d % 60 == 0 and minutes * d >= 120])
        activity = rng.choice(_ACTIVITIES).format(**p)
        question = _fill(rng, (
            "{name} {activity} for {minutes} minutes a day, {days} days a week. "
            "How many hours does {he} spend on it each week?",
            "Every week, {name} {activity} on {days} days for {minutes} minutes each time. "
            "How many hours is that per week?",
        ), activity=activity, minutes=minutes, days=days, **p)
        week_calc, week = _calc(minutes, "*", days)
        hours_calc, hours = _calc(week, "/", 60)
        steps = [f"That is {week_calc} minutes a week.", f"In hours that is {hours_calc} hours."]
        return question, steps, hours
    if kind == 1:
        homework, reading, chores, days = (rng.randint(10, 40), rng.randint(5, 30),
                                           rng.randint(5, 20), rng.randint(2, 7))
        question = _fill(rng, (
            "Each day {name} spends {homework} minutes on homework, {reading} minutes reading and "
            "{chores} minutes cleaning {his} room. How many minutes is that over {days} days?",
            "{name} does {homework} minutes of homework, reads for {reading} "
            "minutes and does {chores} minutes of chores every day. "
            "How many minutes does {he} spend on these in {days} days?",
        ), homework=homework, reading=reading, chores=chores, days=days, **p)
        two_calc, two = _calc(homework, "+", reading)
        day_calc, day = _calc(two, "+", chores)
        total_calc, total = _calc(day, "*", days)
        steps = [
            f"Homework and reading take {two_calc} minutes.",
            f"With chores it is {day_calc} minutes a day.",
            f"Over {days} days that is {total_calc} minutes.",
        ]
        return question, steps, total
    hours, extra = rng.randint(2, 4), rng.randint(5, 55)
    show = rng.choice(("movie", "play", "football match", "concert", "train ride"))
    question = _fill(rng, (
        "{name} watches a {show} that lasts {hours} hours and {extra} minutes. "
        "How many minutes long is it?",
        "The {show} {name} goes to takes {hours} hours and {extra} minutes. "
        "How long is that in minutes?",
    ), show=show, hours=hours, extra=extra, **p)
    hours_calc, in_minutes = _calc(hours, "*", 60)
    total_calc, total = _calc(in_minutes, "+", extra)
    steps = [f"{hours} hours is {hours_calc} minutes.", f"The {show} lasts {total_calc} minutes."]
    return question, steps, total


def _pages_reading(rng: random.Random) -> _Drawn:
    p = _person(rng)
    book = rng.choice(_BOOKS)
    per_day, days = rng.randint(5, 30), rng.randint(2, 7)
    kind = rng.randrange(3)
    if kind == 2:
        first = rng.randint(5, 40)
        times = rng.randint(2, 3)
        pages = first + first * times + rng.randint(10, 200)
        day1, day2 = rng.choice((("Monday", "Tuesday"), ("Saturday", "Sunday"),
                                 ("the first day", "the second day")))
        word = {2: "twice", 3: "three times"}[times]
        question = _fill(rng, (
            "{name}'s {book} has {pages} pages. {He} reads {first} pages on {day1} and {word} as "
            "many on {day2}. How many pages are left?",
            "A {book} is {pages} pages long. {name} reads {first} pages on {day1}, then {word} "
            "that many on {day2}. How many pages does {he} still have to read?",
        ), book=book, pages=pages, first=first, day1=day1, word=word, day2=day2, **p)
        second_calc, second = _calc(first, "*", times)
        read_calc, read = _calc(first, "+", second)
        left_calc, left = _calc(pages, "-", read)
        steps = [f"On {day2} {p['he']} reads {second_calc} pages.",
                 f"So far {p['he']} has read {read_calc} pages.",
                 f"There are {left_calc} pages left."]
        return question, steps, left
    read_calc, read = _calc(per_day, "*", days)
    if kind == 0:
        pages = read + rng.randint(10, 250)
        question = _fill(rng, (
            "{name} is reading a {pages}-page {book}. "
            "{He} reads {per_day} pages a day for {days} days. How many pages are left?",
            "A {book} has {pages} pages. If {name} reads {per_day} pages every day for {days} "
            "days, how many pages will {he} have left?",
        ), pages=pages, book=book, per_day=per_day, days=days, **p)
        left_calc, left = _calc(pages, "-", read)
        steps = [f"{p['He']} reads {read_calc} pages.", f"There are {left_calc} pages left."]
        return question, steps, left
    pages = per_day * (days + rng.randint(1, 8))
    question = _fill(rng, (
        "A {book} has {pages} pages. {name} reads {per_day} pages a day and has been reading for "
        "{days} days. How many more days will {he} need to finish it?",
        "{name} reads {per_day} pages of a {pages}-page {book} each day. "
        "After {days} days, how many more days does it take to finish at the same pace?",
    ), book=book, pages=pages, per_day=per_day, days=days, **p)
    left_calc, left = _calc(pages, "-", read)
    more_calc, more = _calc(left, "/", per_day)
    steps = [f"{p['He']} has read {read_calc} pages.", f"That leaves {left_calc} pages.",
             f"It takes {more_calc} more days."]
    return question, steps, more


def _bus_passengers(rng: random.Random) -> _Drawn:
    p = _person(rng)
    vehicle = rng.choice(("bus", "train", "tram", "ferry"))
    kind = rng.randrange(3)
    start = rng.randint(10, 50)
    off1, on1 = rng.randint(2, start - 2), rng.randint(2, 30)
    if kind == 2 and (start - off1 + on1) % 2:
        on1 += 1  # half of the riders must be a whole number
    after_off_calc, after_off = _calc(start, "-", off1)
    after_calc, after = _calc(after_off, "+", on1)
    steps = [f"After {off1} get off, {after_off_calc} are left.",
             f"After {on1} get on, there are {after_calc}."]
    opening = _fill(rng, (
        "A {vehicle} leaves the station with {start} passengers. "
        "At the first stop, {off1} people get off and {on1} get on.",
        "{name} drives a {vehicle} that starts with {start} passengers. "
        "At the first stop {off1} passengers leave and {on1} board.",
        "{name} is riding a {vehicle} with {start} passengers on it. "
        "At the first stop {off1} get off and then {on1} get on.",
    ), vehicle=vehicle, start=start, off1=off1, on1=on1, **p)
    if kind == 0:
        return f"{opening} How many passengers are on the {vehicle} now?", steps, after
    if kind == 1:
        off2, on2 = rng.randint(2, after - 2), rng.randint(2, 25)
        off_calc, remaining = _calc(after, "-", off2)
        on_calc, final = _calc(remaining, "+", on2)
        steps += [f"At the second stop {off_calc} stay on.",
                  f"Then {on_calc} passengers are on board."]
        question = (f"{opening} At the second stop, {off2} get off and {on2} get on. "
                    f"How many passengers are on the {vehicle} after the second stop?")
        return question, steps, final
    half_calc, half = _calc(after, "/", 2)
    steps.append(f"Half of them stay on, which is {half_calc}.")
    return (f"{opening} At the next stop, half of the passengers get off. "
            f"How many are still on the {vehicle}?", steps, half)


def _fruit_baskets(rng: random.Random) -> _Drawn:
    p = _person(rng)
    fruit = rng.choice(_FRUITS)
    baskets, per_basket = rng.randint(2, 8), rng.randint(6, 20)
    total_calc, total = _calc(baskets, "*", per_basket)
    steps = [f"There are {total_calc} {fruit}."]
    if rng.random() < 0.5:
        bad = rng.randint(2, min(15, total - 2))
        question = _fill(rng, (
            "{name} picks {baskets} baskets of {fruit} with {per_basket} {fruit} in each basket. "
            "{bad} of them are bruised and get thrown away. How many good {fruit} are left?",
            "There are {baskets} baskets holding {per_basket} {fruit} each in {name}'s kitchen. "
            "{He} finds {bad} rotten ones and removes them. How many {fruit} remain?",
        ), baskets=baskets, fruit=fruit, per_basket=per_basket, bad=bad, **p)
        good_calc, good = _calc(total, "-", bad)
        steps.append(f"{good_calc} {fruit} are good.")
        return question, steps, good
    bag = rng.randint(2, min(10, total // 4))
    # Set aside an amount that leaves a whole number of bags (and at least one fruit aside).
    bad = total % bag or bag
    if bad == 1:
        bad += bag
    if bad + 4 * bag <= total:  # still at least two bags to fill
        bad += bag * rng.randint(0, 2)
    question = _fill(rng, (
        "{name} has {baskets} baskets with {per_basket} {fruit} in each. {He} gives {bad} to the "
        "neighbors and puts the rest into bags of {bag}. How many bags does {he} fill?",
        "At the farm stand there are {baskets} baskets of {per_basket} {fruit}. {name} sets aside "
        "{bad} {fruit} and packs the others in bags holding {bag} each. How many bags are filled?",
    ), baskets=baskets, per_basket=per_basket, fruit=fruit, bad=bad, bag=bag, **p)
    rest_calc, rest = _calc(total, "-", bad)
    bags_calc, bags = _calc(rest, "/", bag)
    steps += [f"{rest_calc} {fruit} go into bags.", f"That fills {bags_calc} bags."]
    return question, steps, bags


def _garden_rows(rng: random.Random) -> _Drawn:
    p = _person(rng)
    plants, produce = rng.choice(_CROPS)
    rows, per_row = rng.randint(2, 9), rng.randint(3, 12)
    kind = rng.randrange(3)
    if kind == 0:
        added = rng.randint(2, 6)
        question = _fill(rng, (
            "{name} plants {rows} rows of {plants} with {per_row} in each row. "
            "Later {he} adds {added} more rows of the same size. How many {plants} are there now?",
            "{name}'s garden has {rows} rows of {per_row} {plants}. {He} makes room for {added} "
            "more rows just like them. How many {plants} does the garden have then?",
        ), rows=rows, plants=plants, per_row=per_row, added=added, **p)
        rows_calc, all_rows = _calc(rows, "+", added)
        total_calc, total = _calc(all_rows, "*", per_row)
        steps = [f"There are {rows_calc} rows.", f"That makes {total_calc} {plants}."]
        return question, steps, total
    yield_each = rng.randint(2, 8)
    count_calc, count = _calc(rows, "*", per_row)
    crop_calc, crop = _calc(count, "*", yield_each)
    steps = [f"There are {count_calc} {plants}.", f"They give {crop_calc} {produce}."]
    if kind == 1:
        question = _fill(rng, (
            "{name} has {rows} rows of {plants} with {per_row} plants per row. "
            "Each plant gives {yield_each} {produce}. How many {produce} does {he} harvest?",
            "In {name}'s garden there are {rows} rows of {per_row} {plants}. "
            "If every plant produces {yield_each} {produce}, how many {produce} are there?",
        ), rows=rows, plants=plants, per_row=per_row, yield_each=yield_each, produce=produce, **p)
        return question, steps, crop
    given = rng.randint(2, crop // 2)
    question = _fill(rng, (
        "{name} grows {rows} rows of {plants}, {per_row} in each row, and each plant "
        "gives {yield_each} {produce}. {He} gives {given} {produce} to the neighbors. "
        "How many does {he} keep?",
        "There are {rows} rows of {plants} with {per_row} in each row. Every plant yields "
        "{yield_each} {produce}, and {name} sells {given} of them. How many {produce} are left?",
    ), rows=rows, plants=plants, per_row=per_row, yield_each=yield_each, produce=produce,
       given=given, **p)
    kept_calc, kept = _calc(crop, "-", given)
    steps.append(f"{kept_calc} {produce} are left.")
    return question, steps, kept


def _piggy_bank(rng: random.Random) -> _Drawn:
    p = _person(rng)
    kind = rng.randrange(3)
    if kind == 2:
        bills, coins = rng.randint(10, 80), rng.randint(2, 30)
        spent = rng.randint((bills + coins) // 3, (bills + coins) // 2)
        thing = rng.choice(_SAVING_GOALS)
        question = _fill(rng, (
            "{name} empties {his} piggy bank and finds {bills} dollars in bills and "
            "{coins} dollars in coins. {He} spends {spent} dollars on a used {thing}. "
            "How much money is left?",
            "There are {bills} dollars in bills and {coins} dollars in coins in {name}'s "
            "piggy bank. After paying {spent} dollars for a secondhand {thing}, "
            "how many dollars does {he} have?",
        ), bills=bills, coins=coins, spent=spent, thing=thing, **p)
        total_calc, total = _calc(bills, "+", coins)
        left_calc, left = _calc(total, "-", spent)
        steps = [f"The piggy bank holds {total_calc} dollars.",
                 f"After spending, {left_calc} dollars are left."]
        return question, steps, left
    if kind == 0:
        (name1, value1), (name2, value2) = rng.sample((
            ("five-dollar bills", 5), ("ten-dollar bills", 10), ("two-dollar coins", 2),
            ("twenty-dollar bills", 20),
        ), 2)
        unit = "dollars"
    else:
        (name1, value1), (name2, value2) = rng.sample((("nickels", 5), ("dimes", 10),
                                                       ("quarters", 25)), 2)
        unit = "cents"
    count1, count2 = rng.randint(2, 15), rng.randint(2, 15)
    question = _fill(rng, (
        "{name}'s piggy bank holds {count1} {name1} and {count2} {name2}. "
        "How many {unit} are in it?",
        "{name} counts {count1} {name1} and {count2} {name2} in {his} piggy bank. "
        "How much money is that in {unit}?",
    ), count1=count1, name1=name1, count2=count2, name2=name2, unit=unit, **p)
    calc1, part1 = _calc(count1, "*", value1)
    calc2, part2 = _calc(count2, "*", value2)
    total_calc, total = _calc(part1, "+", part2)
    steps = [f"The {name1} are worth {calc1} {unit}.", f"The {name2} are worth {calc2} {unit}.",
             f"In total there are {total_calc} {unit}."]
    return question, steps, total


def _tickets(rng: random.Random) -> _Drawn:
    p = _person(rng)
    event = rng.choice(_VENUES)
    kind = rng.randrange(3)
    if kind == 0:
        adult_price = rng.randint(8, 25)
        child_price = rng.randint(3, adult_price - 1)
        adults, children = rng.randint(2, 4), rng.randint(2, 6)
        question = _fill(rng, (
            "Tickets to the {event} cost {adult_price} dollars for adults and {child_price} "
            "dollars for children. {name} buys tickets for {adults} adults and {children} "
            "children. How much does {he} pay?",
            "At the {event}, an adult ticket is {adult_price} "
            "dollars and a child ticket is {child_price} dollars. "
            "How much do {adults} adult tickets and {children} child tickets cost {name}?",
        ), event=event, adult_price=adult_price, child_price=child_price, adults=adults,
           children=children, **p)
        calc1, cost1 = _calc(adults, "*", adult_price)
        calc2, cost2 = _calc(children, "*", child_price)
        total_calc, total = _calc(cost1, "+", cost2)
        steps = [f"The adult tickets cost {calc1} dollars.",
                 f"The child tickets cost {calc2} dollars.",
                 f"Together they cost {total_calc} dollars."]
        return question, steps, total
    if kind == 1:
        show, sold, price = rng.choice(_SHOWS), rng.randint(10, 80), rng.randint(2, 9)
        costs = rng.randint(sold * price // 3, sold * price - 2)
        question = _fill(rng, (
            "{name}'s club sells {sold} tickets to a {show} for {price} dollars each. "
            "Putting on the {show} costs {costs} dollars. How much profit does the club make?",
            "{name} sells {sold} tickets at {price} dollars apiece for the {show}. "
            "The costs are {costs} dollars. How many dollars are left after paying the costs?",
        ), sold=sold, show=show, price=price, costs=costs, **p)
        income_calc, income = _calc(sold, "*", price)
        profit_calc, profit = _calc(income, "-", costs)
        steps = [f"The tickets bring in {income_calc} dollars.",
                 f"The profit is {profit_calc} dollars."]
        return question, steps, profit
    adults, children, price = rng.randint(2, 6), rng.randint(2, 12), rng.randint(3, 15)
    question = _fill(rng, (
        "{name} takes a group of {adults} adults and {children} children to the {event}. "
        "Every ticket costs {price} dollars. How much do the tickets cost?",
        "A group going to the {event} with {name} has {children} children and {adults} adults. "
        "Tickets are {price} dollars each, whatever the age. What is the total?",
    ), adults=adults, children=children, event=event, price=price, **p)
    people_calc, people = _calc(adults, "+", children)
    total_calc, total = _calc(people, "*", price)
    steps = [f"There are {people_calc} people.", f"The tickets cost {total_calc} dollars."]
    return question, steps, total


def _packing_boxes(rng: random.Random) -> _Drawn:
    p = _person(rng)
    items = rng.choice(_PACKABLE)
    per_box, boxes = rng.randint(3, 12), rng.randint(2, 15)
    count = per_box * boxes
    boxes_calc, _ = _calc(count, "/", per_box)
    steps = [f"{p['He']} fills {boxes_calc} boxes."]
    kind = rng.randrange(3)
    if kind == 0:
        weight, unit = rng.randint(2, 20), rng.choice(("kilograms", "pounds"))
        question = _fill(rng, (
            "{name} packs {count} {items} into boxes that hold {per_box} each. "
            "Each full box weighs {weight} {unit}. How many {unit} do all the boxes weigh?",
            "There are {count} {items} to ship, {per_box} to a box, and a full box weighs {weight} "
            "{unit}. What is the total weight that {name} ships, in {unit}?",
        ), count=count, items=items, per_box=per_box, weight=weight, unit=unit, **p)
        weight_calc, total = _calc(boxes, "*", weight)
        steps.append(f"They weigh {weight_calc} {unit}.")
        return question, steps, total
    if kind == 1:
        already = rng.randint(2, 20)
        question = _fill(rng, (
            "A truck already carries {already} boxes. {name} packs {count} {items}, {per_box} to a "
            "box, and loads them too. How many boxes are on the truck?",
            "{name} puts {count} {items} into boxes of {per_box} and stacks them next to {already} "
            "boxes already in the shed. How many boxes are there in all?",
        ), already=already, count=count, items=items, per_box=per_box, **p)
        total_calc, total = _calc(boxes, "+", already)
        steps.append(f"Now there are {total_calc} boxes.")
        return question, steps, total
    shipping, fee = rng.randint(2, 9), rng.randint(3, 15)
    question = _fill(rng, (
        "{name} sends {count} {items} in boxes of {per_box}. Shipping costs {shipping} dollars per "
        "box plus a {fee}-dollar service fee. How much does {he} pay?",
        "To mail {count} {items}, {name} packs {per_box} in each box. Each box costs {shipping} "
        "dollars to send, and the post office adds {fee} dollars once. What is the total cost?",
    ), count=count, items=items, per_box=per_box, shipping=shipping, fee=fee, **p)
    ship_calc, ship = _calc(boxes, "*", shipping)
    total_calc, total = _calc(ship, "+", fee)
    steps += [f"Shipping the boxes costs {ship_calc} dollars.",
              f"With the fee it is {total_calc} dollars."]
    return question, steps, total


def _temperature_change(rng: random.Random) -> _Drawn:
    p = _person(rng)
    scale = rng.choice(("degrees", "degrees Celsius", "degrees Fahrenheit"))
    per_hour, hours = rng.randint(2, 6), rng.randint(2, 6)
    change_calc, change = _calc(per_hour, "*", hours)
    kind = rng.randrange(3)
    if kind == 2:
        start = change + rng.randint(3, 30)
        question = _fill(rng, (
            "In the evening the temperature in {name}'s town is {start} {scale}. It drops "
            "{per_hour} {scale} every hour for {hours} hours. What is the temperature then?",
            "{name} reads {start} {scale} on the thermometer at sunset. "
            "The temperature falls by {per_hour} {scale} an hour for the next {hours} hours. "
            "What does the thermometer show after that?",
        ), start=start, scale=scale, per_hour=per_hour, hours=hours, **p)
        temp_calc, temp = _calc(start, "-", change)
        steps = [f"It drops {change_calc} {scale}.", f"The temperature is {temp_calc} {scale}."]
        return question, steps, temp
    start = rng.randint(5, 25)
    temp_calc, temp = _calc(start, "+", change)
    steps = [f"It rises {change_calc} {scale}.", f"By then it is {temp_calc} {scale}."]
    if kind == 0:
        question = _fill(rng, (
            "At 8 in the morning it is {start} {scale} in {name}'s town. The temperature rises "
            "{per_hour} {scale} each hour for {hours} hours. How warm is it then?",
            "{name} checks the thermometer in the morning and sees {start} {scale}. "
            "It gets {per_hour} {scale} warmer every hour for {hours} hours. "
            "What is the temperature after that?",
        ), start=start, scale=scale, per_hour=per_hour, hours=hours, **p)
        return question, steps, temp
    drop = rng.randint(2, temp - 3)
    question = _fill(rng, (
        "In the morning it is {start} {scale}. The temperature climbs {per_hour} "
        "{scale} per hour for {hours} hours, then falls {drop} {scale} by night. "
        "What is the night temperature {name} sees?",
        "{name} notes {start} {scale} at breakfast. Over {hours} hours it warms up by "
        "{per_hour} {scale} each hour, and in the evening it cools down by {drop} {scale}. "
        "What is the evening temperature?",
    ), start=start, scale=scale, per_hour=per_hour, hours=hours, drop=drop, **p)
    night_calc, night = _calc(temp, "-", drop)
    steps.append(f"At night it is {night_calc} {scale}.")
    return question, steps, night


def _wages(rng: random.Random) -> _Drawn:
    p = _person(rng)
    job = rng.choice(_JOBS)
    per_hour, hours, days = rng.randint(6, 20), rng.randint(2, 6), rng.randint(2, 6)
    daily_calc, daily = _calc(per_hour, "*", hours)
    total_calc, total = _calc(daily, "*", days)
    steps = [f"{p['He']} earns {daily_calc} dollars a day.",
             f"Over {days} days that is {total_calc} dollars."]
    kind = rng.randrange(3)
    if kind == 0:
        question = _fill(rng, (
            "{name} works {job} and earns {per_hour} dollars an hour. "
            "{He} works {hours} hours a day for {days} days. How much does {he} earn?",
            "{name} gets paid {per_hour} dollars per hour {job}. "
            "How many dollars does {he} make working {hours} hours on each of {days} days?",
        ), job=job, per_hour=per_hour, hours=hours, days=days, **p)
        return question, steps, total
    if kind == 1:
        bonus = rng.randint(5, 50)
        question = _fill(rng, (
            "{name} earns {per_hour} dollars an hour {job}, working {hours} hours a day for {days} "
            "days. {He} also gets a {bonus}-dollar bonus. How much does {he} earn in all?",
            "Working {job}, {name} makes {per_hour} dollars per hour. {He} works {hours} hours a "
            "day on {days} days and receives a bonus of {bonus} dollars. What is {his} total pay?",
        ), per_hour=per_hour, job=job, hours=hours, days=days, bonus=bonus, **p)
        bonus_calc, paid = _calc(total, "+", bonus)
        steps.append(f"With the bonus {p['he']} earns {bonus_calc} dollars.")
        return question, steps, paid
    spent = rng.randint(5, total // 2)
    question = _fill(rng, (
        "{name} earns {per_hour} dollars an hour {job}. {He} works {hours} hours a day for {days} "
        "days and then spends {spent} dollars on a present. How much of {his} pay is left?",
        "{name} works {job} for {hours} hours a day on {days} days at {per_hour} dollars an hour. "
        "Afterwards {he} spends {spent} dollars. "
        "How many dollars does {he} have left from the job?",
    ), per_hour=per_hour, job=job, hours=hours, days=days, spent=spent, **p)
    left_calc, left = _calc(total, "-", spent)
    steps.append(f"{p['He']} has {left_calc} dollars left.")
    return question, steps, left


def _class_teams(rng: random.Random) -> _Drawn:
    p = _person(rng)
    group = rng.choice(("class", "summer camp group", "sports club", "chess club", "gym class",
                        "scout troop"))
    team_size, teams = rng.randint(2, 8), rng.randint(2, 8)
    kind = rng.randrange(3)
    absent = rng.randint(2, 5) if kind == 2 else 0
    total = team_size * teams + absent
    girls = rng.randint(2, total - 2)
    boys = total - girls
    students_calc, students = _calc(girls, "+", boys)
    steps = [f"There are {students_calc} students."]
    if kind == 2:
        facts = _fill(rng, (
            "{name}'s {group} has {girls} girls and {boys} boys. "
            "Today {absent} of them are absent, and the rest form teams of {team_size}.",
            "There are {girls} girls and {boys} boys in {name}'s {group}. "
            "{absent} stay home sick, and everyone else is split into teams of {team_size}.",
        ), group=group, girls=girls, boys=boys, absent=absent, team_size=team_size, **p)
        present_calc, present = _calc(students, "-", absent)
        steps.append(f"{present_calc} students are there today.")
    else:
        facts = _fill(rng, (
            "{name}'s {group} has {girls} girls and {boys} boys. "
            "They split into teams of {team_size}.",
            "Coach {name} has a {group} of {girls} girls and {boys} boys and puts them into teams "
            "of {team_size} players.",
        ), group=group, girls=girls, boys=boys, team_size=team_size, **p)
        present = students
    teams_calc, team_count = _calc(present, "/", team_size)
    steps.append(f"That makes {teams_calc} teams.")
    if kind == 1:
        balls = rng.randint(2, 5)
        balls_calc, needed = _calc(team_count, "*", balls)
        steps.append(f"The teams need {balls_calc} balls.")
        return f"{facts} Each team gets {balls} balls. How many balls are needed?", steps, needed
    return f"{facts} How many teams are there?", steps, team_count


def _water_tank(rng: random.Random) -> _Drawn:
    p = _person(rng)
    container = rng.choice(_CONTAINERS_OF_WATER)
    unit = rng.choice(("liters", "gallons"))
    minutes = rng.randint(3, 30)
    if rng.random() < 0.5:
        rate, already = rng.randint(2, 15), rng.randint(5, 200)
        capacity = already + rate * minutes
        question = _fill(rng, (
            "A {container} holds {capacity} {unit} and already has {already} {unit} in it. {name} "
            "fills it with a hose at {rate} {unit} per minute. How many minutes until it is full?",
            "{name}'s {container} can hold {capacity} {unit}. It has {already} {unit} now, and "
            "water flows in at {rate} {unit} a minute. How long, in minutes, will it take to fill?",
        ), container=container, capacity=capacity, unit=unit, already=already, rate=rate, **p)
        steps = []
    else:
        rate1, rate2, already = rng.randint(2, 9), rng.randint(2, 9), rng.randint(5, 150)
        capacity = already + (rate1 + rate2) * minutes
        question = _fill(rng, (
            "A {container} holds {capacity} {unit} and has {already} {unit} in it. "
            "{name} fills it with two hoses, one giving {rate1} {unit} per minute and the other "
            "{rate2} {unit} per minute. How many minutes does it take to fill?",
            "{name} uses two hoses to top up a {container} that holds {capacity} {unit}. It "
            "already has {already} {unit}. The hoses deliver {rate1} and {rate2} {unit} a minute. "
            "How many minutes until it is full?",
        ), container=container, capacity=capacity, unit=unit, already=already, rate1=rate1,
           rate2=rate2, **p)
        rate_calc, rate = _calc(rate1, "+", rate2)
        steps = [f"Together the hoses give {rate_calc} {unit} per minute."]
    need_calc, need = _calc(capacity, "-", already)
    time_calc, time = _calc(need, "/", rate)
    steps += [f"It needs {need_calc} more {unit}.", f"That takes {time_calc} minutes."]
    return question, steps, time


def _collection(rng: random.Random) -> _Drawn:
    p = _person(rng)
    things = rng.choice(("stickers", "baseball cards", "stamps", "beads", "postcards", "coins",
                         "comic books"))
    start, packs, per_pack = rng.randint(5, 120), rng.randint(2, 9), rng.randint(3, 12)
    bought_calc, bought = _calc(packs, "*", per_pack)
    kind = rng.randrange(3)
    if kind == 1 and (start + bought) % 2:
        start += 1  # an even total so that half of it is a whole number
    total_calc, total = _calc(start, "+", bought)
    steps = [f"{p['He']} gets {bought_calc} new {things}.",
             f"Now {p['he']} has {total_calc} {things}."]
    facts = _fill(rng, (
        "{name} has {start} {things}. {He} buys {packs} packs with {per_pack} {things} in each.",
        "{name}'s collection has {start} {things}, and {he} adds {packs} packs of {per_pack}.",
    ), start=start, things=things, packs=packs, per_pack=per_pack, **p)
    if kind == 0:
        return f"{facts} How many {things} does {p['he']} have now?", steps, total
    if kind == 1:
        half_calc, half = _calc(total, "/", 2)
        steps.append(f"{p['He']} keeps {half_calc} {things}.")
        return (f"{facts} Then {p['he']} gives half of all {p['his']} {things} to a friend. "
                f"How many does {p['he']} keep?", steps, half)
    lost = rng.randint(2, total // 2)
    left_calc, left = _calc(total, "-", lost)
    steps.append(f"{p['He']} has {left_calc} {things} left.")
    return f"{facts} Later {p['he']} loses {lost} of them. How many {things} are left?", steps, left


def _fuel_cost(rng: random.Random) -> _Drawn:
    p = _person(rng)
    if rng.random() < 0.5:
        distance_unit, fuel, efficiency, price = ("kilometers", "liter", rng.randint(8, 20),
                                                  rng.randint(2, 3))
    else:
        distance_unit, fuel, efficiency, price = ("miles", "gallon", rng.randint(20, 40),
                                                  rng.randint(3, 5))
    fields = dict(distance_unit=distance_unit, fuel=fuel, efficiency=efficiency, price=price, **p)
    if rng.random() < 0.5:
        distance = efficiency * rng.randint(2, 20)
        question = _fill(rng, (
            "{name}'s car goes {efficiency} {distance_unit} on one "
            "{fuel} of fuel, and fuel costs {price} dollars per {fuel}. "
            "How much does the fuel cost for a drive of {distance} {distance_unit}?",
            "{name} drives {distance} {distance_unit}. The car travels {efficiency} "
            "{distance_unit} per {fuel}, and each {fuel} costs {price} dollars. "
            "What does the fuel for the drive cost?",
        ), distance=distance, **fields)
        steps = []
    else:
        one_way = efficiency * rng.randint(1, 10)
        question = _fill(rng, (
            "{name} drives to a town {one_way} {distance_unit} away and back. The car goes "
            "{efficiency} {distance_unit} per {fuel}, and fuel costs {price} dollars per {fuel}. "
            "How much does the fuel for the round trip cost?",
            "A round trip takes {name} to a lake {one_way} {distance_unit} away and home again. "
            "{His} car gets {efficiency} {distance_unit} per {fuel}, and one {fuel} costs {price} "
            "dollars. What is the fuel cost?",
        ), one_way=one_way, **fields)
        trip_calc, distance = _calc(one_way, "*", 2)
        steps = [f"The round trip is {trip_calc} {distance_unit}."]
    fuel_calc, needed = _calc(distance, "/", efficiency)
    cost_calc, cost = _calc(needed, "*", price)
    steps += [f"The car uses {fuel_calc} {fuel}s.", f"The fuel costs {cost_calc} dollars."]
    return question, steps, cost


# ---------------------------------------------------------------------------
# The families by name, in the order that drawing a family picks from
# ---------------------------------------------------------------------------

FAMILY_GENERATORS: dict[str, Callable[[random.Random], _Drawn]] = {
    "shopping_change": _shopping_change,
    "sharing_equally": _sharing_equally,
    "travel": _travel,
    "ages": _ages,
    "area_perimeter": _area_perimeter,
    "unit_price": _unit_price,
    "saving_weekly": _saving_weekly,
    "percent_discount": _percent_discount,
    "recipe_scaling": _recipe_scaling,
    "multi_step_buying": _multi_step_buying,
    "giving_away": _giving_away,
    "time_minutes": _time_minutes,
    "pages_reading": _pages_reading,
    "bus_passengers": _bus_passengers,
    "fruit_baskets": _fruit_baskets,
    "garden_rows": _garden_rows,
    "piggy_bank": _piggy_bank,
    "tickets": _tickets,
    "packing_boxes": _packing_boxes,
    "temperature_change": _temperature_change,
    "wages": _wages,
    "class_teams": _class_teams,
    "water_tank": _water_tank,
    "collection": _collection,
    "fuel_cost": _fuel_cost,
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_GENERATORS)
