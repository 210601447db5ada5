"""seed protocol templates

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

Habit templates (cue, routine, reward) across sleep, exercise, nutrition, hydration,
mindfulness, recovery and social life, each with a Don't Die-shaped protocol
(`name`, `description`, `goal`, `category`, `type`). Ids are derived from the names, so they
are the same on every database; the downgrade removes exactly these rows.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_NAMESPACE = uuid.UUID("6f1c2a52-8d1e-4f4b-9a57-3f0c6b1d2e90")

# (habit_type, name, cue, routine, reward, description, goal)
TEMPLATES = [
    ("sleep", "Consistent Wake Time",
     "Your alarm goes off at the same time every day, weekends included.",
     "Get up with the first alarm, open the curtains or step outside for daylight within "
     "30 minutes, and keep the wake time within 30 minutes of your target.",
     "Mark the day on your streak calendar and enjoy your morning coffee in daylight.",
     "Wake at the same time every day to anchor the body clock and make falling asleep easier.",
     "Wake within 30 minutes of the target time on at least 6 days a week."),
    ("sleep", "Screen-Free Wind-Down",
     "A phone reminder one hour before your target bedtime.",
     "Dim the lights, put phones and laptops outside the bedroom and do something calm: "
     "reading on paper, a warm shower or light stretching.",
     "A cup of caffeine-free herbal tea and a chapter of a book you enjoy.",
     "A screen-free hour before bed to fall asleep faster and sleep longer.",
     "Be in bed with screens off at the target bedtime on at least 5 nights a week."),
    ("exercise", "Daily Brisk Walk",
     "Right after lunch, put on your walking shoes.",
     "Walk briskly, fast enough that talking takes a little effort, for the planned minutes.",
     "Listen to a favourite podcast episode that you only play while walking.",
     "A daily brisk walk to raise step count and cardiovascular fitness.",
     "Reach the daily step target on at least 5 days a week."),
    ("exercise", "Zone 2 Cardio",
     "Your workout clothes, laid out where you will see them first thing.",
     "Cycle, jog, swim or row at a conversational pace (about 60-70% of maximum heart rate).",
     "Log the session and watch your weekly cardio minutes add up.",
     "Steady, conversational-pace cardio that builds aerobic base and metabolic health.",
     "Accumulate at least 150 minutes of moderate cardio every week."),
    ("exercise", "Bodyweight Strength Circuit",
     "After your morning coffee, roll out the exercise mat.",
     "Rounds of squats, push-ups (incline if needed), glute bridges, backpack rows and a plank, "
     "resting as needed between exercises.",
     "Write down your reps and beat one number from last week.",
     "A short full-body strength circuit that needs no equipment.",
     "Two to three strength sessions every week with steadily rising reps."),
    ("nutrition", "Vegetables First",
     "Sitting down to lunch or dinner.",
     "Eat a fist-sized portion of vegetables or salad before the rest of the meal, slowly and "
     "without screens.",
     "Notice feeling satisfied for longer and tick the meal off in your food log.",
     "Start main meals with vegetables to improve fibre intake and blood-sugar response.",
     "Five portions of vegetables and fruit every day."),
    ("nutrition", "Early Kitchen Close",
     "An evening alarm three hours before your bedtime.",
     "Finish the last meal or snack, brush your teeth and close the kitchen for the night.",
     "A calm evening activity you look forward to, free of snacking.",
     "Stop eating three hours before bed for better sleep and overnight metabolism.",
     "No food in the last three hours before bed on at least 5 days a week."),
    ("hydration", "Morning Glass of Water",
     "A full glass of water waiting on your nightstand.",
     "Drink a large glass of water (about 500 ml) before coffee or breakfast.",
     "Your first coffee of the day, enjoyed after the water.",
     "Rehydrate first thing in the morning after the night's fast.",
     "Reach the daily water target every day, starting with 500 ml on waking."),
    ("hydration", "Refill at Every Break",
     "Every time you stand up from your desk or finish a meeting.",
     "Refill a marked water bottle and drink a few mouthfuls; keep it in sight while working.",
     "Tick off each mark on the bottle as you reach it.",
     "Spread water intake across the day with a visible bottle and regular refills.",
     "Drink the daily water target spread across the working day."),
    ("mindfulness", "Box Breathing Break",
     "Before opening email or messages in the morning.",
     "Sit upright and breathe in for 4 seconds, hold 4, out 4, hold 4, for the planned minutes.",
     "Start the workday calm; note your stress level before and after.",
     "Slow, paced breathing to lower stress before the day starts.",
     "A breathing session every day, with lower self-rated stress after four weeks."),
    ("mindfulness", "Evening Gratitude Journal",
     "Getting into bed at night.",
     "Write down three specific things that went well today and why they happened.",
     "Re-read the week's entries on Sunday evening.",
     "A short evening journal that shifts attention to what went well.",
     "Journal on at least 6 evenings a week."),
    ("recovery", "Mobility and Stretching",
     "Straight after a workout, or at 8 pm on rest days.",
     "A gentle mobility flow for hips, hamstrings, upper back and shoulders; hold each stretch "
     "30-60 seconds while breathing slowly.",
     "Notice how much easier moving feels and track how far you can reach.",
     "Regular mobility work to recover from training and keep joints moving freely.",
     "A mobility session on at least 3 days a week."),
    ("recovery", "Planned Rest Day",
     "The rest day marked in your calendar.",
     "No hard training: an easy walk, an early night, a protein-rich meal and plenty of water.",
     "A relaxing treat such as a sauna, a bath or time outdoors.",
     "Deliberate rest days so training turns into fitness instead of fatigue.",
     "At least one planned rest day each week, with resting heart rate stable or falling."),
    ("social", "Weekly Connection Call",
     "A Sunday-afternoon reminder with a name on it.",
     "Call (not text) a friend or family member and talk for the planned minutes.",
     "Agree on the next time you will meet while you are still on the call.",
     "A weekly call to keep close relationships strong.",
     "One real conversation with someone close every week."),
    ("social", "Walk and Talk",
     "Monday: invite a friend or colleague to a walk later in the week.",
     "Walk together at an easy pace for the planned minutes, phones away.",
     "Good company, fresh air and extra steps in one go.",
     "Combine social time with movement through regular walks with others.",
     "A shared walk at least once a week."),
]

_CATEGORY = {"sleep": "Sleep", "exercise": "Exercise", "nutrition": "Nutrition",
             "hydration": "Hydration", "mindfulness": "Mindfulness", "recovery": "Recovery",
             "social": "Social"}


def template_id(name: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, name)


def _table() -> sa.Table:
    return sa.table(
        'protocoltemplate',
        sa.column('id', sa.Uuid()),
        sa.column('habit_type', sa.String(64)),
        sa.column('name', sa.String(200)),
        sa.column('cue', sa.Text()),
        sa.column('routine', sa.Text()),
        sa.column('reward', sa.Text()),
        sa.column('dd_protocol_json', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql')),
        sa.column('is_active', sa.Boolean()),
        sa.column('created_at', sa.DateTime(timezone=True)),
    )


def upgrade() -> None:
    now = datetime.now(timezone.utc)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # the models store naive UTC on SQLite
    rows = [
        {"id": template_id(name), "habit_type": habit, "name": name, "cue": cue,
         "routine": routine, "reward": reward, "is_active": True, "created_at": now,
         "dd_protocol_json": {"name": name, "description": description, "goal": goal,
                              "category": _CATEGORY[habit], "type": "Habit"}}
        for habit, name, cue, routine, reward, description, goal in TEMPLATES
    ]
    op.bulk_insert(_table(), rows)


def downgrade() -> None:
    table = _table()
    op.execute(table.delete().where(table.c.id.in_([template_id(t[1]) for t in TEMPLATES])))
