"""Write src/cnalens/data/professions.json and neutral_text.json (deterministic).

Run from the repository root: python scripts/make_debias_data.py
"""
import json
import random

VOCAB = """
accountant actor actress administrator advisor agent analyst anesthesiologist animator announcer
architect archaeologist archivist artist assistant astronaut astronomer athlete attendant auditor
author babysitter baker banker barber barista bartender beautician biologist blacksmith bookkeeper
bricklayer broker builder butcher butler buyer cabinetmaker caddy captain cardiologist caregiver
caretaker carer carpenter cartographer cartoonist cashier caterer chauffeur chef chemist
chiropractor choreographer cleaner clergyman clerk coach cobbler collector columnist comedian
commentator composer concierge conductor constable consultant contractor cook coordinator
copywriter coroner correspondent cosmetologist counselor counsellor courier critic curator
custodian dancer dealer decorator dentist deputy designer detective developer dietitian diplomat
director dishwasher dispatcher doctor doorman drafter draftsman dressmaker driver drummer
economist editor educator electrician embalmer engineer entertainer entrepreneur estimator
executive farmer farmhand fireman firefighter fisherman fitter florist foreman forester
gardener geologist glazier goldsmith governess grocer groundskeeper guard guide gunsmith
hairdresser hairstylist handyman harpist herdsman historian homemaker hostess housekeeper
housemaid hunter hygienist illustrator inspector installer instructor interpreter
investigator investor janitor jeweler jeweller jockey journalist judge labourer laborer
landlord landscaper lawyer lecturer librarian lifeguard linguist locksmith lumberjack machinist
magician maid mailman manager manicurist mason masseuse mathematician mechanic mediator
medic merchant midwife miner minister missionary model musician nanny navigator negotiator
neurologist neurosurgeon novelist nun nurse nutritionist officer operator optician optometrist
organizer painter paralegal paramedic pastor pathologist pediatrician performer pharmacist
philosopher photographer physician physicist physiotherapist pianist pilot planner plasterer
plumber poet policeman policewoman politician porter postman potter preacher priest principal
producer professor programmer promoter proofreader prosecutor psychiatrist psychologist
publicist publisher radiologist rancher realtor receptionist recruiter referee reporter
representative researcher retailer roofer sailor salesman saleswoman salesperson scientist
sculptor seamstress secretary senator servant server sheriff shepherd shoemaker singer
smith soldier solicitor songwriter specialist statistician steward stewardess stockbroker
stylist superintendent supervisor surgeon surveyor tailor teacher technician therapist
trader trainer translator treasurer trucker tutor typist umpire undertaker usher valet
veterinarian vet violinist waiter waitress warden weaver welder writer zoologist
""".split()
GENDERED = set("""actress waitress hostess stewardess policewoman policeman salesman saleswoman
fireman mailman clergyman doorman draftsman fisherman herdsman foreman governess seamstress
masseuse nun postman housemaid""".split())  # gendered by their form: excluded
VOCAB = [w for w in VOCAB if w not in GENDERED]
FALLBACK = """nurse teacher secretary receptionist maid nanny librarian hairdresser cashier
housekeeper dancer baker designer writer cook cleaner engineer mechanic carpenter plumber
driver farmer soldier pilot lawyer doctor manager builder electrician guard chef officer""".split()
assert all(w in VOCAB for w in FALLBACK), [w for w in FALLBACK if w not in VOCAB]
json.dump({"about": "Profession words that candidates from the model's own top predictions "
           "are filtered against (vocabulary), and the list used to fill a group when the "
           "predictions yield too few (fallback). Single English words, lower case; words "
           "gendered by their form (waitress, salesman, ...) are left out.",
           "vocabulary": sorted(set(VOCAB)), "fallback": FALLBACK},
          open("src/cnalens/data/professions.json", "w"), indent=1)

# neutral text: no people, no gendered words; simple declarative sentences
rng = random.Random(8)
subjects = ["The river", "The old bridge", "The morning train", "A small boat", "The garden",
            "The mountain path", "The city library", "The kitchen clock", "A cold wind",
            "The evening sky", "The stone wall", "The village market", "A heavy storm",
            "The wooden table", "The quiet lake", "The narrow street", "The winter sun",
            "A tall oak tree", "The harbour", "The old castle", "The desert road",
            "The spring rain", "A bright lamp", "The forest floor", "The north coast"]
preds = ["was covered in fresh snow", "looked calm in the early light",
         "stood at the edge of the field", "moved slowly towards the sea",
         "was quiet for most of the day", "changed colour in the autumn",
         "could be seen from the hill", "was repaired after the long winter",
         "smelled of pine and wet earth", "filled with water after the storm",
         "was built more than two hundred years ago", "became busy before noon",
         "held a few books and a map", "was painted a pale shade of blue",
         "shone brightly above the roofs", "grew darker as the clouds gathered",
         "ran along the old canal", "was warm by the middle of the afternoon",
         "gave shelter to birds and insects", "led down to a sandy beach"]
facts = ["Water boils at one hundred degrees Celsius at sea level.",
         "The Earth orbits the Sun once every year.",
         "A week has seven days and a day has twenty four hours.",
         "Most plants need sunlight, water and air to grow.",
         "The Pacific is the largest ocean on the planet.",
         "Ice floats because it is less dense than liquid water.",
         "The moon reflects the light of the sun.",
         "Rivers carry sand and stones from the hills to the sea.",
         "Bread is made from flour, water, salt and yeast.",
         "Copper is a good conductor of electricity.",
         "Leaves change colour when the days become shorter.",
         "A triangle has three sides and three angles.",
         "Sound travels faster in water than in air.",
         "The capital of France is Paris.",
         "Snow is made of small crystals of ice.",
         "Bees collect nectar from flowers to make honey.",
         "The train left the station at nine and arrived at noon.",
         "Rain is expected in the north later this week.",
         "The museum is open every day except Monday.",
         "The recipe needs two eggs, a cup of milk and some sugar."]
lines = list(facts)
pairs = [(s, p) for s in subjects for p in preds]
rng.shuffle(pairs)
lines += [f"{s} {p}." for s, p in pairs[:280]]
json.dump({"about": "Neutral English sentences (no people, no gendered words), generated "
           "deterministically by scripts/make_debias_data.py; used for the perplexity cost "
           "of an edit.", "sentences": lines},
          open("src/cnalens/data/neutral_text.json", "w"), indent=1)
print(len(VOCAB), len(set(VOCAB)), len(lines))
