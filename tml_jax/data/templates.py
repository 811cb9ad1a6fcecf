"""Text templates of the synthetic conversations, one bank per behaviour.

Entry i of every bank is held out for the test split iff i % 4 == 3 (conversation.HOLDOUT_EVERY),
so each bank keeps at least 4 entries and the order of entries is part of the split: append
new entries at the end. {slot} fields draw from SLOTS once per conversation, so a question and
its answer agree. Answers are short and checkable where a tool is involved.
"""

from __future__ import annotations

SLOTS = {
    "food": ("pasta", "lentil soup", "pancakes", "curry", "a salad", "tacos", "risotto",
             "fried rice", "chili", "omelettes"),
    "city": ("Lisbon", "Kyoto", "Denver", "Nairobi", "Oslo", "Lima", "Cairo", "Seoul",
             "Dublin", "Hanoi"),
    "animal": ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "puppy"),
    "hobby": ("painting", "running", "chess", "gardening", "knitting", "climbing", "baking",
              "photography"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "name": ("Sam", "Maria", "Tom", "Priya", "Alex", "Nina", "Leo", "Grace", "Omar", "Ruth"),
    "pet_name": ("Biscuit", "Pepper", "Luna", "Max", "Olive", "Mango", "Ziggy", "Clover"),
    "task": ("stretch", "drink some water", "check the oven", "call my mom", "take a break",
             "water the plants", "move the laundry", "feed the cat", "send that email"),
}

FILLERS = ("um", "uh", "so", "well", "hmm", "let me think", "you know")
USER_BACKCHANNELS = ("mm-hmm", "yeah", "right", "okay", "uh-huh", "I see", "sure", "oh nice")
MODEL_BACKCHANNELS = ("mm-hmm", "yeah", "right", "I see", "uh-huh", "okay")
ACKS = ("Let me check.", "One moment.", "Let me work that out.",
        "Give me a second to look that up.", "Good question, let me find out.", "Checking now.")

# (what the user adds after a background question so that the model waits, what releases
# it): a held delegation (task_scenarios.delegation), whose question lies seconds before
# the DELEGATE, beyond the interaction model's window.
HOLDS = (
    ("Wait, do not answer yet, let me find a pen.", "Okay, go ahead."),
    ("Hold on, someone is at the door.", "Sorry about that, go on."),
    ("Actually, give me a moment, I am writing this down.", "Right, I am ready now."),
    ("Just a second, let me open my notes.", "Okay, tell me."),
    ("Hang on, my phone is ringing.", "Sorry, what was the answer?"),
    ("Wait, let me grab some paper first.", "Alright, go ahead."),
    ("One second, I need to sit down.", "Okay, I am listening."),
    ("Hold that thought, the kettle is boiling.", "Okay, so what is it?"),
)

# (user question, model answer)
TURN_PAIRS = (
    ("What should I cook for dinner tonight?",
     "How about {food}? It is quick and you probably have what you need."),
    ("Can you suggest a name for my new {animal}?",
     "Sure, what about {pet_name}? It is short and friendly."),
    ("Is it a good idea to visit {city} in the winter?",
     "Winter in {city} can be lovely, just pack a warm coat."),
    ("How do I get better at {hobby}?",
     "Practice a little every day, and learn from someone more experienced."),
    ("What is a fun thing to do on a rainy {day}?",
     "You could bake something, watch a film, or start a puzzle."),
    ("How long should I boil an egg?",
     "About seven minutes gives you a firm white and a soft yolk."),
    ("Do you think I need an umbrella today?",
     "If the sky looks grey, it is safer to bring one."),
    ("Any tips for sleeping better?",
     "Keep a regular bedtime and put your phone away an hour before."),
    ("What is a good gift for a friend who likes {hobby}?",
     "Something for {hobby} would be thoughtful, maybe a nice book about it."),
    ("How can I keep my {animal} happy?",
     "Give it attention every day, fresh water, and a clean place to rest."),
    ("Should I learn Spanish or French first?",
     "Pick the one you will use most, that keeps you motivated."),
    ("What is the best way to start running?",
     "Begin with short easy runs and walk breaks, then build up slowly."),
    ("How do I make my plants grow faster?",
     "Give them more light, water them regularly, and feed them in spring."),
    ("Can you recommend a quick breakfast?",
     "Oatmeal with fruit is quick, cheap and filling."),
    ("What should I pack for a weekend in {city}?",
     "Comfortable shoes, a light jacket and a charger for your phone."),
    ("How do I stop putting things off?",
     "Break the task into tiny steps and start the first one right now."),
    ("Is {food} healthy?",
     "It can be, if you add plenty of vegetables and go easy on the salt."),
    ("What should I do this {day} evening?",
     "Maybe invite a friend over and cook {food} together."),
    ("How often should I water a cactus?",
     "Only when the soil is completely dry, so about every two weeks."),
    ("Can you help me plan a trip to {city}?",
     "Of course. Start with how many days you have and what you like to do."),
)

# (fragments of one user turn with mid-utterance pauses between them, model answer)
PAUSED_TURNS = (
    (("I would like to book a table for", "four people tomorrow evening."),
     "Sure, a table for four tomorrow evening. What time works for you?"),
    (("So I was thinking that maybe we could", "go to {city} next month."),
     "{city} next month sounds like a great plan."),
    (("Can you tell me how to", "fix a flat bike tire?"),
     "Take the wheel off, find the hole, and patch the tube."),
    (("My favourite thing to cook is", "probably {food}."),
     "{food} is a great choice, it is hard to get wrong."),
    (("The thing about my {animal} is that it", "never wants to sleep at night."),
     "Try playing with it more in the evening, so it is tired by bedtime."),
    (("I need to remember to buy", "milk, eggs and", "some bread."),
     "Milk, eggs and bread. Got it."),
    (("What I really want to know is", "whether I should", "take the train or drive."),
     "The train is usually more relaxing, if the times work for you."),
    (("Tomorrow I have to", "call my dentist and", "finish a report."),
     "That is a busy day. Maybe call the dentist first thing."),
    (("I was wondering if", "you could explain how", "compound interest works."),
     "Interest is added to your balance, and then earns interest itself."),
    (("The best part of my trip to {city} was", "the food at the night market."),
     "Night markets are wonderful. What did you try?"),
    (("Could you help me write a", "short message to", "my landlord?"),
     "Sure. Tell me what the message should say."),
    (("For my birthday I want to", "try {hobby} for the first time."),
     "That sounds fun. Look for a beginner class near you."),
)

# (user request for an explanation, model's long answer)
LONG_ANSWERS = (
    ("How does a rainbow form?",
     "A rainbow forms when sunlight enters raindrops. The light bends as it goes in, reflects "
     "off the back of the drop, and bends again as it leaves. Each colour bends a little "
     "differently, so the white light spreads into bands."),
    ("How do bees make honey?",
     "Bees collect nectar from flowers and carry it back to the hive. There they pass it from "
     "bee to bee and fan it with their wings, which dries it out. When it is thick enough they "
     "seal it in wax cells."),
    ("Why is the sky blue?",
     "Sunlight contains every colour. Air molecules scatter short blue waves much more than "
     "long red ones, so blue light reaches your eyes from every direction of the sky. At "
     "sunset the light travels further and the blue is scattered away."),
    ("How does a bicycle stay upright?",
     "Mostly because the rider steers. When the bike starts to lean, you turn the front wheel "
     "into the lean without noticing, and that brings the wheels back under you. The shape "
     "of the fork helps it steer itself a little too."),
    ("How do I make bread at home?",
     "Mix flour, water, salt and yeast into a dough, then knead it for about ten minutes. Let "
     "it rise until it doubles, shape it, and let it rise again. Bake it in a hot oven until "
     "the crust is brown."),
    ("What happens when we sleep?",
     "Your brain cycles through light sleep, deep sleep and dreaming sleep several times a "
     "night. Deep sleep helps the body recover, and dreaming sleep helps with memory. Each "
     "cycle takes about ninety minutes."),
    ("How do airplanes fly?",
     "The wings are shaped and tilted so that air is pushed downwards as the plane moves. "
     "Pushing air down pushes the wing up, and that force is called lift. The engines only "
     "need to keep the plane moving fast enough."),
    ("Why do cats purr?",
     "Cats purr by vibrating the muscles of their voice box very quickly. They often purr "
     "when they are content, but also when they are hurt or nervous. Some scientists think "
     "the vibration even helps their bones heal."),
    ("How does a fridge keep food cold?",
     "A fridge pumps a special fluid through pipes. The fluid evaporates inside the fridge and "
     "takes heat with it, then a compressor squeezes it back into a liquid outside, where "
     "the heat escapes through the coils at the back."),
    ("Can you explain how {hobby} helps with stress?",
     "{hobby} gives your mind one clear thing to focus on. That pulls attention away from "
     "worries, and finishing small goals feels rewarding. Doing it regularly also gives "
     "your week a calm routine."),
    ("What is special about {city}?",
     "{city} has a long history and a very lively food scene. Many visitors love simply "
     "walking around the old neighbourhoods. The best time to go is spring, when it is "
     "mild and not too crowded."),
    ("How do volcanoes erupt?",
     "Deep underground, rock melts into magma that is lighter than the rock around it. It "
     "rises and collects in a chamber, and gas dissolved in it builds up pressure. When the "
     "pressure is too high, the magma bursts through the surface."),
)

# (what the user says when barging in, model's reply)
INTERRUPTIONS = (
    ("Wait, sorry, can I ask something else?", "Of course, go ahead."),
    ("Hold on, what about {food} instead?", "{food} works too, and it is even quicker."),
    ("Sorry to cut in, how long does that take?", "Usually just a few minutes."),
    ("Stop, stop, I think I got it.", "Great, let me know if you need more."),
    ("Actually, never mind, tell me about {city}.", "Sure. {city} is a wonderful place."),
    ("Wait, can you say that more simply?", "Sure, in short, it is all about energy."),
    ("Okay, okay, that is enough detail.", "No problem, I will keep it short."),
    ("Hang on, my {animal} just jumped on the table.", "No worries, take your time."),
)

# (sentences of a long user turn, model's answer after it)
USER_STORIES = (
    (("So yesterday I went to the market.", "It was really crowded.",
      "I found a stall selling fresh {food}.", "Then I ran into an old friend from school."),
     "That sounds like a lovely day. Did you catch up with your friend?"),
    (("I have been trying to learn {hobby}.", "At first it was really hard.",
      "But now I practice every evening.", "I think I am finally getting better."),
     "That is great progress. Practising every evening really pays off."),
    (("My {animal} did something funny today.", "It hid behind the curtain.",
      "Then it jumped out when my neighbour came in.", "She screamed so loudly."),
     "That is hilarious. I hope your neighbour recovered."),
    (("We are planning a trip to {city}.", "My partner wants to see the museums.",
      "I mostly want to try the food.", "We only have four days though."),
     "Four days is enough for both, if you plan one museum each morning."),
    (("Work has been really busy lately.", "We have a big launch next week.",
      "I keep staying late at the office.", "And I barely see my friends."),
     "That sounds exhausting. Try to protect at least one evening for yourself."),
    (("I moved to a new apartment last month.", "It is smaller than my old one.",
      "But the light in the morning is amazing.", "And the neighbours are friendly."),
     "Morning light and friendly neighbours sound like a good trade."),
    (("This morning my train was late again.", "I waited on the platform for twenty minutes.",
      "Then it was so full I had to stand.", "I got to work completely soaked."),
     "What a start to the day. Maybe an earlier train would be less crowded."),
    (("I finally finished reading that long novel.", "It took me almost three months.",
      "The ending was really surprising.", "I still keep thinking about it."),
     "Congratulations. A book that stays with you is the best kind."),
)

# Background talkers (a TV, a radio, someone else in the room).
BACKGROUND = (
    "Traffic on the main road is moving slowly this morning.",
    "And now, the weather for the weekend looks sunny and warm.",
    "Did anyone see where I left my keys?",
    "The meeting has been moved to three o'clock.",
    "Our next guest is a chef from {city}.",
    "Scores from last night's games are coming up after the break.",
    "Can somebody turn the music down a little?",
    "The library will close early on {day}.",
)

# (user addressing another person in the room, that person's reply)
TO_OTHER = (
    ("Hey {name}, can you close the window?", "Sure, give me a second."),
    ("{name}, do you want some tea?", "Yes please, with milk."),
    ("{name}, have you seen my phone?", "It is on the kitchen table."),
    ("Hold on {name}, I am almost ready.", "Okay, I will wait in the car."),
    ("{name}, can you grab the mail?", "Already did, it is on the shelf."),
    ("Thanks {name}, that was really helpful.", "Anytime."),
    ("{name}, what time is dinner?", "Around seven, I think."),
    ("{name}, please feed the {animal} before you go.", "Okay, I will do it now."),
)

# (user request, model acknowledgement, model's words when due); {n} seconds, {task}
# (user asks, model acknowledges as it delegates, model says when the reminder fires,
#  tool, its arguments). The background model calls the tool; the engine feeds the fired
#  reminder in as TEXT_IN (tml_jax.tools.clock). "every" reminders repeat with period {n}.
REMINDERS = (
    ("Remind me in {n} seconds to {task}.", "Okay, I will remind you in {n} seconds.",
     "Hey, it is time to {task}.", "remind", "{n} seconds; {task}"),
    ("Set a timer for {n} seconds.", "Timer set for {n} seconds.",
     "Your {n} second timer is done.", "timer", "{n} seconds"),
    ("Remind me every {n} seconds to {task}.", "Okay, every {n} seconds.",
     "Time to {task} again.", "remind", "every {n} seconds; {task}"),
    ("Can you remind me to {task} in {n} seconds?", "Will do.", "Time to {task}.", "remind",
     "{n} seconds; {task}"),
    ("Start a {n} second timer please.", "Starting a {n} second timer now.",
     "Time is up, {n} seconds have passed.", "timer", "{n} seconds"),
    ("In {n} seconds, tell me to {task}.", "Sure, in {n} seconds.",
     "Reminder, you wanted to {task}.", "remind", "{n} seconds; {task}"),
    ("Every {n} seconds, tell me to {task}.", "Sure, I will keep reminding you.",
     "Reminder, {task}.", "remind", "every {n} seconds; {task}"),
    ("Ping me in {n} seconds.", "Okay.", "Ping, {n} seconds are up.", "timer", "{n} seconds"),
    ("Give me a nudge in {n} seconds to {task}.", "Got it.",
     "Here is your nudge, please {task}.", "remind", "{n} seconds; {task}"),
    ("Keep reminding me to {task} every {n} seconds.", "Okay, every {n} seconds then.",
     "Once more, time to {task}.", "remind", "every {n} seconds; {task}"),
    ("Let me know in {n} seconds when to {task}.", "I will let you know.",
     "Now is a good time to {task}.", "remind", "{n} seconds; {task}"),
    ("Nudge me every {n} seconds to {task}.", "Will do, every {n} seconds.",
     "Another nudge, please {task}.", "remind", "every {n} seconds; {task}"),
)

# (user asks the model to watch, model acknowledges)
WATCH_REQUESTS = (
    ("Tell me if anything shows up on the screen.", "Sure, I am watching."),
    ("Keep an eye on the camera for me.", "Okay, I will keep watching."),
    ("Let me know when something appears.", "Will do."),
    ("Can you watch the video and tell me what you see?", "Of course."),
    ("Watch the screen and call out anything new.", "Okay, watching now."),
    ("Please look out for anything that pops up.", "Sure thing."),
    ("Tell me when you spot something.", "I will tell you."),
    ("Watch this for me, okay?", "Okay, I am looking."),
)
# {{thing}} survives the slot filling as {thing}, then takes the description of what appeared.
VISUAL_REMARKS = ("Oh, I see a {{thing}}.", "A {{thing}} just appeared.",
                  "There is a {{thing}} now.", "Look, a {{thing}}.",
                  "I can see a {{thing}} on the screen.", "Something new, a {{thing}}.",
                  "Now there is a {{thing}}.", "I spot a {{thing}}.")

# (user request, model acknowledgement, model's answer with {count} and {object})
COUNT_REQUESTS = (
    ("Can you count how many times the ball bounces?", "Okay, counting.",
     "The {object} bounced {count} times."),
    ("Count the bounces for me please.", "Sure, I am counting.", "That was {count} bounces."),
    ("How many times will it bounce? Count them.", "Counting now.", "I counted {count}."),
    ("Keep count of the bounces.", "Will do.", "{count} bounces in total."),
    ("Tell me how many bounces you see.", "Okay.", "I saw {count} bounces."),
    ("Count each bounce of the {object}.", "Sure.", "It bounced {count} times."),
)

LANG_NAMES = {"es": "Spanish", "fr": "French", "de": "German"}
TRANSLATE_REQUESTS = (
    ("Please translate what I say from {lang}.", "Sure, go ahead in {lang}."),
    ("Can you translate my {lang} into English as I speak?", "Yes, I will translate."),
    ("I am going to speak {lang}, translate for me.", "Okay, ready."),
    ("Be my {lang} interpreter for a moment.", "Happy to, start whenever you like."),
    ("Translate this {lang} for me, please.", "Of course."),
    ("Help me understand some {lang}.", "Sure, go ahead."),
)
PHRASES = (
    dict(en="Good morning.", es="Buenos días.", fr="Bonjour.", de="Guten Morgen."),
    dict(en="Where is the train station?", es="¿Dónde está la estación de tren?",
         fr="Où est la gare?", de="Wo ist der Bahnhof?"),
    dict(en="I would like a coffee, please.", es="Quisiera un café, por favor.",
         fr="Je voudrais un café, s'il vous plaît.", de="Ich hätte gern einen Kaffee, bitte."),
    dict(en="How much does it cost?", es="¿Cuánto cuesta?", fr="Combien ça coûte?",
         de="Wie viel kostet das?"),
    dict(en="The weather is nice today.", es="Hace buen tiempo hoy.",
         fr="Il fait beau aujourd'hui.", de="Das Wetter ist heute schön."),
    dict(en="My name is Anna.", es="Me llamo Anna.", fr="Je m'appelle Anna.",
         de="Ich heiße Anna."),
    dict(en="I do not understand.", es="No entiendo.", fr="Je ne comprends pas.",
         de="Ich verstehe nicht."),
    dict(en="Thank you very much.", es="Muchas gracias.", fr="Merci beaucoup.",
         de="Vielen Dank."),
    dict(en="Where is the bathroom?", es="¿Dónde está el baño?", fr="Où sont les toilettes?",
         de="Wo ist die Toilette?"),
    dict(en="I am hungry.", es="Tengo hambre.", fr="J'ai faim.", de="Ich habe Hunger."),
    dict(en="We are going to the beach.", es="Vamos a la playa.", fr="Nous allons à la plage.",
         de="Wir gehen zum Strand."),
    dict(en="See you tomorrow.", es="Hasta mañana.", fr="À demain.", de="Bis morgen."),
    dict(en="The bus is late.", es="El autobús llega tarde.", fr="Le bus est en retard.",
         de="Der Bus hat Verspätung."),
    dict(en="Can you help me?", es="¿Puede ayudarme?", fr="Pouvez-vous m'aider?",
         de="Können Sie mir helfen?"),
    dict(en="I live in a small town.", es="Vivo en un pueblo pequeño.",
         fr="J'habite dans une petite ville.", de="Ich wohne in einer kleinen Stadt."),
    dict(en="The soup is very hot.", es="La sopa está muy caliente.",
         fr="La soupe est très chaude.", de="Die Suppe ist sehr heiß."),
)

# Background-model questions: question wordings per tool; operands are drawn per conversation.
ARITHMETIC = (  # (question, answer, result text); a, b operands, c the result
    ("What is {a} times {b}?", "{a} times {b} is {c}.", "{a} * {b} = {c}", "mul"),
    ("What's {a} plus {b}?", "{a} plus {b} is {c}.", "{a} + {b} = {c}", "add"),
    ("How much is {a} minus {b}?", "{a} minus {b} is {c}.", "{a} - {b} = {c}", "sub"),
    ("Can you multiply {a} by {b}?", "That is {c}.", "{a} * {b} = {c}", "mul"),
    ("What do I get if I add {a} and {b}?", "You get {c}.", "{a} + {b} = {c}", "add"),
    ("Quick, {a} times {b}?", "It is {c}.", "{a} * {b} = {c}", "mul"),
    ("What is {a} take away {b}?", "That leaves {c}.", "{a} - {b} = {c}", "sub"),
    ("Could you work out {a} times {b} for me?", "{a} times {b} is {c}.", "{a} * {b} = {c}",
     "mul"),
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CLOCK = (  # day arithmetic; {day} start, {n} days, {c} result
    ("What day is it {n} days after {day}?", "{n} days after {day} is {c}.",
     "weekday({day} + {n}) = {c}"),
    ("If today is {day}, what day is it in {n} days?", "It will be {c}.",
     "weekday({day} + {n}) = {c}"),
    ("Which day comes {n} days after {day}?", "That would be {c}.",
     "weekday({day} + {n}) = {c}"),
    ("Starting on {day}, what day is {n} days later?", "{c}.", "weekday({day} + {n}) = {c}"),
)
FACTS = (  # (question, answer, result text): local knowledge lookups
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon.", "Lisbon"),
    ("How many legs does a spider have?", "A spider has eight legs.", "8"),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet.",
     "Jupiter"),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo"),
    ("At what temperature does water boil?", "Water boils at one hundred degrees Celsius.",
     "100 C"),
    ("How many days are in a leap year?", "A leap year has 366 days.", "366"),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "Ottawa"),
    ("How many continents are there?", "There are seven continents.", "7"),
    ("Which planet is closest to the sun?", "Mercury is closest to the sun.", "Mercury"),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "Nairobi"),
    ("How many minutes are in a day?", "A day has 1440 minutes.", "1440"),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "Lima"),
)


# "clock now": the answer's {s} is the conversation time of the call, in whole seconds.
CLOCK_NOW = (
    ("How long have we been talking?", "We have been talking for {s} seconds."),
    ("How much time has passed since we started?", "{s} seconds so far."),
    ("What is the time in our conversation now?", "We are {s} seconds in."),
    ("How long has this call been going?", "About {s} seconds."),
    ("Can you check how long we have been chatting?", "It has been {s} seconds."),
)
# (question, spoken answer, chart title): three numbers the user says, charted as bars.
CHARTS = (
    ("Can you make a chart of {a}, {b} and {c}?", "Your chart is ready.", "numbers"),
    ("Please plot {a}, {b} and {c} for me.", "Done, the plot is ready.", "plot"),
    ("Draw a bar chart with {a}, {b} and {c}.", "The bar chart is ready.", "bar chart"),
    ("Chart these numbers: {a}, {b}, {c}.", "Here is your chart.", "these numbers"),
    ("Could you graph {a}, {b} and {c}?", "Your graph is ready.", "graph"),
)


def background_question(scene) -> dict:
  """A question with a checkable answer for the background model: dict(tool, args, question,
  answer): the model speaks `answer` once tool(args) has answered (`delegation` runs the
  real tool; a clock "now" answer's {s} is filled from the call's time)."""
  tool = scene.choice(("calculator", "clock", "clock", "knowledge", "chart"))
  if tool == "calculator":
    q, a, r, op = scene.pick(ARITHMETIC, "arithmetic")
    x, y = int(scene.rng.integers(2, 30)), int(scene.rng.integers(2, 30))
    if op == "sub" and y > x:
      x, y = y, x
    c = {"mul": x * y, "add": x + y, "sub": x - y}[op]
    return dict(tool=tool, args=r.format(a=x, b=y, c=c).split(" = ")[0],
                question=q.format(a=x, b=y), answer=a.format(a=x, b=y, c=c))
  if tool == "clock" and scene.rng.random() < 0.5:
    q, a = scene.pick(CLOCK_NOW, "clock_now")
    return dict(tool=tool, args="now", question=q, answer=a)
  if tool == "clock":
    q, a, r = scene.pick(CLOCK, "clock")
    d, n = int(scene.rng.integers(7)), int(scene.rng.integers(2, 12))
    kw = dict(day=WEEKDAYS[d], n=n, c=WEEKDAYS[(d + n) % 7])
    return dict(tool=tool, args=r.format(**kw).split(" = ")[0], question=q.format(**kw),
                answer=a.format(**kw))
  if tool == "chart":
    q, a, title = scene.pick(CHARTS, "charts")
    nums = [int(v) for v in scene.rng.integers(1, 20, size=3)]
    return dict(tool=tool, args=f"{title}; " + ", ".join(map(str, nums)),
                question=q.format(a=nums[0], b=nums[1], c=nums[2]), answer=a)
  q, a, _ = scene.pick(FACTS, "facts")
  return dict(tool=tool, args=q, question=q, answer=a)
