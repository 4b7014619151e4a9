//! Bundled synthetic clinical notes with fake identifiers, for demos, tests and benchmarks.
//!
//! Every note is built from a small set of repetitive, learnable templates (discharge summaries,
//! consult notes, lab reports, referral letters; a few variants each) into which fake identifiers
//! drawn from large random spaces are spliced. Each spliced identifier is recorded as a [`Span`]
//! with Unicode character offsets (end exclusive), so the output can be used directly as the
//! sensitive-span file of a corpus. Generation is fully deterministic under
//! [`SynthConfig::seed`]; a held-out set is simply another seed (and id prefix).
//!
//! Labels: direct identifiers `NAME`, `DATE`, `MRN`, `PHONE`, `EMAIL`, `ADDRESS`; indirect ones
//! `DOCTOR`, `WARD`, `HOSPITAL`, `CITY`, `DIAGNOSIS`.

use super::{pick, MONTHS};
use crate::data::spans::{Document, Span};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    /// Number of notes.
    pub n_notes: usize,
    /// RNG seed: same seed, same notes; another seed, other identifiers.
    pub seed: u64,
    /// Document ids are `{id_prefix}{index:04}`.
    pub id_prefix: String,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n_notes: 100,
            seed: 0,
            id_prefix: "note-".to_string(),
        }
    }
}

/// All labels that [`generate_notes`] can emit.
pub const LABELS: &[&str] = &[
    "NAME",
    "DATE",
    "MRN",
    "PHONE",
    "EMAIL",
    "ADDRESS",
    "DOCTOR",
    "WARD",
    "HOSPITAL",
    "CITY",
    "DIAGNOSIS",
];

// ---------------------------------------------------------------------------------------------
// Value lists. The surrogate module keeps its own, disjoint name lists.

/// Female first names (50).
pub(crate) const FIRST_NAMES_F: &[&str] = &[
    "Zoë",
    "Amélie",
    "Renée",
    "Chloé",
    "Inés",
    "Agnès",
    "Maria",
    "Sofia",
    "Olivia",
    "Emma",
    "Hannah",
    "Leonie",
    "Ingrid",
    "Astrid",
    "Siobhan",
    "Niamh",
    "Aisha",
    "Fatima",
    "Priya",
    "Ananya",
    "Mei",
    "Yuki",
    "Hana",
    "Lucía",
    "Carmen",
    "Beatriz",
    "Margarida",
    "Joana",
    "Katarzyna",
    "Małgorzata",
    "Élodie",
    "Brigitte",
    "Greta",
    "Frieda",
    "Helga",
    "Ruth",
    "Esther",
    "Miriam",
    "Naomi",
    "Grace",
    "Abigail",
    "Evelyn",
    "Harriet",
    "Matilda",
    "Rosalind",
    "Beatrice",
    "Imogen",
    "Clara",
    "Nora",
    "Dagný",
];

/// Male first names (50).
pub(crate) const FIRST_NAMES_M: &[&str] = &[
    "José",
    "François",
    "Søren",
    "Björn",
    "Łukasz",
    "Héctor",
    "Jürgen",
    "Mátyás",
    "André",
    "Rafael",
    "Mateo",
    "Diego",
    "Javier",
    "Pablo",
    "Lorenzo",
    "Matteo",
    "Giovanni",
    "Luca",
    "Henrik",
    "Lars",
    "Magnus",
    "Oskar",
    "Tomasz",
    "Piotr",
    "Dmitri",
    "Ivan",
    "Kenji",
    "Hiroshi",
    "Ravi",
    "Arjun",
    "Omar",
    "Tariq",
    "Kwame",
    "Kofi",
    "Samuel",
    "Elijah",
    "Gabriel",
    "Isaac",
    "Nathaniel",
    "Theodore",
    "Arthur",
    "Frederick",
    "Rupert",
    "Declan",
    "Cormac",
    "Finnian",
    "Ewan",
    "Angus",
    "Thiago",
    "Joaquín",
];

/// Last names (100).
pub(crate) const LAST_NAMES: &[&str] = &[
    "Müller",
    "Núñez",
    "García",
    "Østergaard",
    "Šimek",
    "Kowalczyk",
    "O'Brien",
    "Lefèvre",
    "Dubois",
    "Gonçalves",
    "Fernández",
    "Rodríguez",
    "Jiménez",
    "Schröder",
    "Weiß",
    "Krüger",
    "Bäcklund",
    "Håkansson",
    "Nieminen",
    "Virtanen",
    "Novák",
    "Dvořák",
    "Horváth",
    "Nagy",
    "Popescu",
    "Ionescu",
    "Petrović",
    "Jovanović",
    "Kovačević",
    "Yılmaz",
    "Öztürk",
    "Papadopoulos",
    "Nakamura",
    "Tanaka",
    "Watanabe",
    "Takahashi",
    "Kim",
    "Park",
    "Nguyen",
    "Tran",
    "Pham",
    "Chen",
    "Zhang",
    "Wang",
    "Okonkwo",
    "Adeyemi",
    "Mensah",
    "Abubakar",
    "Haddad",
    "Khoury",
    "Mansour",
    "Rahman",
    "Chowdhury",
    "Iyer",
    "Ramanathan",
    "Banerjee",
    "Kapoor",
    "Fitzgerald",
    "Gallagher",
    "MacLeod",
    "Campbell",
    "Henderson",
    "Whitaker",
    "Ashworth",
    "Pemberton",
    "Thornbury",
    "Blackwood",
    "Hargreaves",
    "Lindqvist",
    "Sandoval",
    "Villanueva",
    "Castellanos",
    "Quintero",
    "Montoya",
    "Ferreira",
    "Carvalho",
    "Moreau",
    "Girard",
    "Fontaine",
    "Rousseau",
    "Bianchi",
    "Ricci",
    "Esposito",
    "Marchetti",
    "Van der Berg",
    "De Vries",
    "Janssen",
    "Vandenberghe",
    "Schultz",
    "Hoffmann",
    "Wagner",
    "Becker",
    "Kaczmarek",
    "Wiśniewski",
    "Zieliński",
    "Sokolov",
    "Volkov",
    "Morozov",
    "Halvorsen",
    "Eriksen",
];

pub(crate) const CITIES: &[&str] = &[
    "Riverton",
    "Ashford",
    "Millbrook",
    "Kingsbridge",
    "Westmere",
    "Oakhaven",
    "Greyhaven",
    "Brightwater",
    "Stonebridge",
    "Fairhaven",
    "Redcliffe",
    "Elmstead",
    "Harrowgate",
    "Lindenfeld",
    "Marlow Heath",
    "Porthallow",
    "Caldermoor",
    "Dunmere",
    "Eastbury",
    "Northwick",
    "Southam",
    "Thornfield",
    "Willowdale",
    "Crestwood",
    "Hollybrook",
    "Ravensworth",
    "Silverdale",
    "Amberley",
    "Bramhall",
    "Coldstream",
    "Deansgate",
    "Evershot",
    "Foxhollow",
    "Glenrothes",
    "Hawkridge",
    "Ivybridge",
    "Juniper Falls",
    "Kestrel Bay",
    "Larkhill",
    "Moorside",
    "Newhaven",
    "Oldcastle",
    "Pinewood",
    "Queensferry",
    "Rosemont",
    "Saltmarsh",
    "Tidewater",
    "Upminster",
    "Valemount",
    "Wrexford",
    "Yarrowdale",
    "Zennor",
    "São Bento",
    "Sainte-Hélène",
    "Königsfeld",
    "Villafranca",
    "Ålesund",
    "Malmöhus",
    "Źródła",
    "Cluj-Napoca",
];

const STREETS: &[&str] = &[
    "Linden",
    "Maple",
    "Cedar",
    "Birch",
    "Hawthorn",
    "Chestnut",
    "Rowan",
    "Juniper",
    "Sycamore",
    "Willow",
    "Meadow",
    "Orchard",
    "Mill",
    "Church",
    "Station",
    "Harbour",
    "Quarry",
    "Bridge",
    "Castle",
    "Abbey",
    "Priory",
    "Market",
    "Victoria",
    "Albert",
    "Kingfisher",
    "Heron",
    "Lark",
    "Primrose",
    "Bluebell",
    "Foxglove",
    "Heather",
    "Thistle",
    "Clover",
    "Ivy",
    "Laurel",
    "Beacon",
    "Windmill",
    "Falcon",
    "Granite",
    "Lakeview",
];

const STREET_SUFFIXES: &[&str] = &[
    "Street", "Road", "Avenue", "Lane", "Drive", "Close", "Way", "Crescent", "Terrace", "Place",
];

const SAINTS: &[&str] = &[
    "Agatha",
    "Bartholomew",
    "Catherine",
    "Columba",
    "Cuthbert",
    "Dominic",
    "Elisabeth",
    "Gregory",
    "Hilda",
    "Jude",
    "Luke",
    "Margaret",
    "Monica",
    "Patrick",
    "Raphael",
    "Teresa",
    "Vincent",
    "Winifred",
];

const HOSPITAL_PATTERNS: &[&str] = &[
    "{C} General Hospital",
    "{C} Royal Infirmary",
    "{C} University Medical Center",
    "{C} Community Hospital",
    "St. {S}'s Hospital",
    "St. {S}'s Medical Centre",
    "{L} Memorial Hospital",
    "{L} Clinic",
];

const SPECIALTIES: &[&str] = &[
    "Cardiology",
    "Respiratory",
    "Neurology",
    "Oncology",
    "Haematology",
    "Gastroenterology",
    "Rheumatology",
    "Nephrology",
    "Acute Medicine",
    "Surgical",
    "Orthopaedic",
    "Endocrinology",
];

const WARD_TREES: &[&str] = &[
    "Oak", "Ash", "Elm", "Beech", "Alder", "Hazel", "Yew", "Larch", "Poplar", "Holly", "Aspen",
    "Spruce",
];

pub(crate) const DIAGNOSES: &[&str] = &[
    "Erdheim-Chester disease",
    "Castleman disease",
    "Takayasu arteritis",
    "Fabry disease",
    "Gaucher disease type 1",
    "Pompe disease",
    "Wilson disease",
    "acromegaly",
    "lymphangioleiomyomatosis",
    "pulmonary alveolar proteinosis",
    "Behçet disease",
    "relapsing polychondritis",
    "IgG4-related disease",
    "Kikuchi-Fujimoto disease",
    "Rosai-Dorfman disease",
    "Langerhans cell histiocytosis",
    "POEMS syndrome",
    "Schnitzler syndrome",
    "adult-onset Still disease",
    "eosinophilic granulomatosis with polyangiitis",
    "hereditary angioedema",
    "paroxysmal nocturnal hemoglobinuria",
    "Waldenström macroglobulinemia",
    "amyloid light-chain amyloidosis",
    "Budd-Chiari syndrome",
    "Whipple disease",
    "Guillain-Barré syndrome",
    "myasthenia gravis",
    "neuromyelitis optica",
    "Creutzfeldt-Jakob disease",
    "Susac syndrome",
    "stiff-person syndrome",
    "Lambert-Eaton myasthenic syndrome",
    "Ehlers-Danlos syndrome",
    "Marfan syndrome",
    "cystinosis",
    "porphyria cutanea tarda",
    "acute intermittent porphyria",
    "pheochromocytoma",
    "Cushing disease",
];

const EMAIL_DOMAINS: &[&str] = &[
    "mailbox.example",
    "inbox.example",
    "postmail.example",
    "webmail.example",
    "example.com",
    "example.org",
    "example.net",
    "letterbox.example",
];

/// Filler sentences without identifiers: repetitive, learnable context.
const CLINICAL: &[&str] = &[
    "Vital signs were within normal limits on arrival.",
    "Medication reconciliation was completed with the pharmacy team.",
    "No known drug allergies were reported.",
    "Renal function remained stable throughout.",
    "Physiotherapy assessed mobility and recommended a walking aid.",
    "The family was updated on the plan of care.",
    "Pain was well controlled with oral analgesia.",
    "There were no complications during the stay.",
    "Inflammatory markers trended down with treatment.",
    "A repeat chest radiograph showed no new changes.",
    "Blood glucose readings were acceptable on the current regimen.",
    "The patient tolerated a normal diet.",
    "Anticoagulation was reviewed and continued at the same dose.",
    "Smoking cessation advice was given.",
    "An echocardiogram showed preserved systolic function.",
    "Nutritional support was arranged with the dietitian.",
];

// ---------------------------------------------------------------------------------------------
// Templates. Placeholders in braces; see `Identity::render_key`. Span-producing keys:
// NAME, FIRST, LAST (NAME); DOB, DATE, DATE2 (DATE); MRN; PHONE; EMAIL; ADDRESS; CITY;
// DOCTOR, DOCTOR2 (DOCTOR); WARD; HOSPITAL; DIAGNOSIS. Plain keys: TITLE (Mr./Ms.),
// PRON / PRON_CAP (he/she), POSS (his/her), CLINICAL (a filler sentence), LABS (lab values).

const DISCHARGE: &[&str] = &[
    "DISCHARGE SUMMARY\nPatient: {NAME}\nRecord no.: {MRN}\nDate of birth: {DOB}\n\
Admitted: {DATE}   Discharged: {DATE2}\nWard: {WARD}, {HOSPITAL}\nAttending physician: {DOCTOR}\n\n\
{NAME} was admitted with worsening symptoms related to {DIAGNOSIS}. {CLINICAL} {TITLE} {LAST} \
remained haemodynamically stable and was discharged home in good condition. {PRON_CAP} will be \
followed up in clinic by {DOCTOR}. {CLINICAL}\n\
Contact: {PHONE}. Home address: {ADDRESS}, {CITY}.",
    "{HOSPITAL}\nDischarge summary for {NAME} ({MRN}), born {DOB}.\n\n\
Admission date: {DATE}. Discharge date: {DATE2}. Ward: {WARD}. Consultant: {DOCTOR}.\n\n\
Principal diagnosis: {DIAGNOSIS}.\n\n\
Hospital course: {TITLE} {LAST} presented with fatigue and was treated for a flare of \
{POSS} known condition. {CLINICAL} {CLINICAL} {PRON_CAP} was discharged on the current \
medication with advice to return if symptoms recur.\n\n\
Follow-up: outpatient review with {DOCTOR}. The GP has been informed. {FIRST} can be reached \
on {PHONE} or at {EMAIL}.",
    "DISCHARGE NOTE - {WARD}, {HOSPITAL}\n\n\
Name: {NAME}   DOB: {DOB}   Record: {MRN}\nAddress: {ADDRESS}, {CITY}\n\n\
Admitted on {DATE} under {DOCTOR} for management of {DIAGNOSIS}. {CLINICAL} \
{CLINICAL} {TITLE} {LAST} was medically fit for discharge on {DATE2}. Discharge medications \
were explained and a written copy was provided. {CLINICAL}\n\n\
Please contact the ward on {PHONE} with any questions about {NAME}.",
];

const CONSULT: &[&str] = &[
    "CONSULTATION NOTE\nDate of consultation: {DATE}\nConsultant: {DOCTOR}\n\
Referred by: {DOCTOR2}\nPatient: {NAME}, born {DOB}, record {MRN}, resident of {CITY}\n\n\
Reason for consultation: evaluation of suspected {DIAGNOSIS}. {TITLE} {LAST} was seen on \
{WARD} at {HOSPITAL}. {CLINICAL} On examination {PRON} was alert and oriented. {CLINICAL}\n\n\
Impression: the presentation is in keeping with {DIAGNOSIS}. Plan: further imaging and review \
in clinic on {DATE2}. {FIRST} agreed with the plan and can be contacted on {PHONE}.",
    "{HOSPITAL} - Specialist Consultation\n\n\
{NAME} (DOB {DOB}, {MRN}) was reviewed on {DATE} at the request of {DOCTOR2}. \
{PRON_CAP} has a history of {DIAGNOSIS} diagnosed several years ago. {CLINICAL} \
{CLINICAL}\n\n\
Assessment: stable disease with no red flag features today. {TITLE} {LAST} was counselled \
about the natural history of the condition and the treatment options.\n\n\
Recommendations: continue current therapy, repeat bloods before the next visit on {DATE2}.\n\n\
{DOCTOR}, {WARD}",
    "Consult note, {WARD}, {HOSPITAL}, {DATE}\n\n\
Patient: {NAME}. Date of birth: {DOB}. Record number: {MRN}.\n\
Address: {ADDRESS}, {CITY}. Email: {EMAIL}.\n\n\
Thank you for asking me to see {TITLE} {LAST}, who is known to have {DIAGNOSIS}. {CLINICAL} \
{CLINICAL} I have discussed the findings with {NAME} and {POSS} family.\n\n\
Plan: adjust treatment as outlined and follow up in four weeks.\n{DOCTOR}",
];

const LAB: &[&str] = &[
    "LABORATORY REPORT\n{HOSPITAL} - Department of Clinical Pathology\n\
Patient: {NAME}   DOB: {DOB}   ID: {MRN}\nRequested by: {DOCTOR}, {WARD}\n\
Collected: {DATE}   Reported: {DATE2}\n\n\
Results: {LABS}\n\n\
Comment: findings are consistent with the known history of {DIAGNOSIS}. {CLINICAL} Results \
were telephoned to the requesting team. Please contact the laboratory if {TITLE} {LAST} \
requires repeat testing.",
    "Pathology results for {NAME} ({MRN})\nSpecimen received {DATE} from {WARD}, {HOSPITAL}.\n\
Date of birth: {DOB}. Requesting clinician: {DOCTOR}.\n\n\
{LABS}\n\n\
Interpretation: the pattern supports ongoing activity of {DIAGNOSIS}. {CLINICAL} \
A further sample from {TITLE} {LAST} is suggested before {DATE2}. Queries to the duty \
biochemist.",
    "LAB RESULTS - {HOSPITAL}\n\
Name: {NAME} | DOB: {DOB} | MRN: {MRN} | Location: {WARD}\n\
Ordering physician: {DOCTOR} | Collected: {DATE}\n\n\
{LABS}\n\n\
Note: sample taken as part of monitoring for {DIAGNOSIS}. {CLINICAL} Results reviewed and \
discussed with {FIRST} by telephone on {PHONE}. Next scheduled sample: {DATE2}.",
];

const REFERRAL: &[&str] = &[
    "{DATE}\n\nDear {DOCTOR2},\n\nRe: {NAME}, DOB {DOB}, {MRN}\n{ADDRESS}, {CITY}\n\n\
Thank you for seeing {TITLE} {LAST}, who has been under my care at {HOSPITAL} for \
{DIAGNOSIS}. {CLINICAL} I would be grateful for your specialist opinion regarding further \
management. {NAME} can be reached on {PHONE} or by email at {EMAIL}.\n\n\
Yours sincerely,\n{DOCTOR}\n{WARD}, {HOSPITAL}",
    "REFERRAL LETTER\n{HOSPITAL}, {WARD}\nDate: {DATE}\n\nTo: {DOCTOR2}\n\n\
I am writing to refer {NAME}, born {DOB} (record {MRN}), of {ADDRESS}, {CITY}. \
{PRON_CAP} was recently diagnosed with {DIAGNOSIS} and would benefit from review in your \
clinic. {CLINICAL} {CLINICAL} {TITLE} {LAST} is aware of this referral and prefers to be \
contacted on {PHONE}.\n\nKind regards,\n{DOCTOR}",
    "Dear {DOCTOR2},\n\n\
I would appreciate your assessment of {NAME} ({MRN}, DOB {DOB}), whom I saw on {DATE}. \
{FIRST} has a background of {DIAGNOSIS}. {CLINICAL} Over the last few months {PRON} has \
reported increasing breathlessness. {CLINICAL}\n\n\
Contact details: {PHONE}, {EMAIL}, {ADDRESS}, {CITY}. {TITLE} {LAST} is happy to attend \
at short notice.\n\nWith thanks,\n{DOCTOR}\n{HOSPITAL}",
];

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum DateFormat {
    Iso,
    Dmy,
    Long,
}

#[derive(Clone, Copy)]
struct Date {
    year: u32,
    month: u32,
    day: u32,
}

impl Date {
    fn format(self, f: DateFormat) -> String {
        match f {
            DateFormat::Iso => format!("{:04}-{:02}-{:02}", self.year, self.month, self.day),
            DateFormat::Dmy => format!("{:02}/{:02}/{:04}", self.day, self.month, self.year),
            DateFormat::Long => format!(
                "{} {}, {}",
                MONTHS[(self.month - 1) as usize],
                self.day,
                self.year
            ),
        }
    }
}

fn random_date<R: Rng + ?Sized>(rng: &mut R, years: std::ops::RangeInclusive<u32>) -> Date {
    let year = rng.random_range(years);
    let month = rng.random_range(1..=12);
    let day = rng.random_range(1..=days_in_month(year, month));
    Date { year, month, day }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

/// `date` plus `days` (small), rolling over months and years.
fn add_days(mut date: Date, days: u32) -> Date {
    date.day += days;
    while date.day > days_in_month(date.year, date.month) {
        date.day -= days_in_month(date.year, date.month);
        date.month += 1;
        if date.month > 12 {
            date.month = 1;
            date.year += 1;
        }
    }
    date
}

/// Lower-case ASCII transliteration (for e-mail handles).
pub(crate) fn ascii_fold(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let mapped: &str = match c {
            'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' | 'ą' => {
                "a"
            }
            'æ' | 'Æ' => "ae",
            'ç' | 'Ç' | 'ć' | 'č' => "c",
            'è' | 'é' | 'ê' | 'ë' | 'É' | 'È' | 'ę' | 'ě' => "e",
            'ì' | 'í' | 'î' | 'ï' | 'ı' | 'İ' => "i",
            'ñ' | 'ń' => "n",
            'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'Ö' | 'Ø' | 'Ó' => "o",
            'ù' | 'ú' | 'û' | 'ü' | 'Ü' => "u",
            'ý' | 'ÿ' => "y",
            'ß' => "ss",
            'ł' | 'Ł' => "l",
            'ś' | 'š' | 'Š' | 'ş' => "s",
            'ź' | 'ż' | 'ž' | 'Ź' => "z",
            'ř' => "r",
            'ð' => "d",
            _ if c.is_ascii_alphanumeric() => {
                out.push(c.to_ascii_lowercase());
                continue;
            }
            _ => "",
        };
        out.push_str(mapped);
    }
    out
}

/// Per-note fake identity: every identifier the templates can refer to.
struct Identity {
    female: bool,
    first: String,
    last: String,
    dob: String,
    date: String,
    date2: String,
    mrn: String,
    phone: String,
    email: String,
    address: String,
    city: String,
    doctor: String,
    doctor2: String,
    ward: String,
    hospital: String,
    diagnosis: String,
}

fn random_person<R: Rng + ?Sized>(rng: &mut R) -> (bool, String, String) {
    let female = rng.random_bool(0.5);
    let first = pick(rng, if female { FIRST_NAMES_F } else { FIRST_NAMES_M });
    (female, first.to_string(), pick(rng, LAST_NAMES).to_string())
}

fn random_doctor<R: Rng + ?Sized>(rng: &mut R) -> String {
    let (_, first, last) = random_person(rng);
    if rng.random_bool(0.5) {
        format!("Dr. {first} {last}")
    } else {
        format!("Dr. {last}")
    }
}

fn random_mrn<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..3) {
        0 => format!("MRN-{:07}", rng.random_range(0..10_000_000u32)),
        1 => format!("MRN{:08}", rng.random_range(0..100_000_000u32)),
        _ => format!(
            "{}{}-{:06}",
            rng.random_range(b'A'..=b'Z') as char,
            rng.random_range(b'A'..=b'Z') as char,
            rng.random_range(0..1_000_000u32)
        ),
    }
}

fn random_phone<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..4) {
        0 => format!(
            "({}) {:03}-{:04}",
            rng.random_range(201..=989),
            rng.random_range(200..=999),
            rng.random_range(0..10_000)
        ),
        1 => format!(
            "+1 {}-{:03}-{:04}",
            rng.random_range(201..=989),
            rng.random_range(200..=999),
            rng.random_range(0..10_000)
        ),
        2 => format!(
            "+44 7{:03} {:06}",
            rng.random_range(0..1000),
            rng.random_range(0..1_000_000)
        ),
        _ => format!(
            "0{} {:03} {:04}",
            rng.random_range(11..=99),
            rng.random_range(0..1000),
            rng.random_range(0..10_000)
        ),
    }
}

fn random_email<R: Rng + ?Sized>(rng: &mut R, first: &str, last: &str) -> String {
    let (f, l) = (ascii_fold(first), ascii_fold(last));
    let domain = pick(rng, EMAIL_DOMAINS);
    match rng.random_range(0..3) {
        0 => format!("{f}.{l}@{domain}"),
        1 => format!(
            "{}{l}{}@{domain}",
            f.chars().next().unwrap_or('x'),
            rng.random_range(1..100)
        ),
        _ => format!("{l}.{f}{}@{domain}", rng.random_range(1950..2010)),
    }
}

fn random_address<R: Rng + ?Sized>(rng: &mut R) -> String {
    let number = if rng.random_bool(0.7) {
        rng.random_range(1..200)
    } else {
        rng.random_range(200..3000)
    };
    let street = pick(rng, STREETS);
    let suffix = pick(rng, STREET_SUFFIXES);
    if rng.random_bool(0.2) {
        format!(
            "Flat {}, {number} {street} {suffix}",
            rng.random_range(1..40)
        )
    } else {
        format!("{number} {street} {suffix}")
    }
}

fn random_hospital<R: Rng + ?Sized>(rng: &mut R) -> String {
    let pattern = pick(rng, HOSPITAL_PATTERNS);
    pattern
        .replace("{C}", pick(rng, CITIES))
        .replace("{S}", pick(rng, SAINTS))
        .replace("{L}", pick(rng, LAST_NAMES))
}

fn random_ward<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..3) {
        0 => format!(
            "Ward {}{}",
            rng.random_range(1..=20),
            rng.random_range(b'A'..=b'F') as char
        ),
        1 => format!(
            "{} Ward {}",
            pick(rng, SPECIALTIES),
            rng.random_range(1..=9)
        ),
        _ => format!("{} Ward", pick(rng, WARD_TREES)),
    }
}

fn random_labs<R: Rng + ?Sized>(rng: &mut R) -> String {
    format!(
        "Haemoglobin {:.1} g/dL, white cell count {:.1} ×10⁹/L, platelets {} ×10⁹/L, \
sodium {} mmol/L, potassium {:.1} mmol/L, creatinine {} µmol/L, CRP {} mg/L.",
        rng.random_range(9.0..16.5f64),
        rng.random_range(3.0..14.0f64),
        rng.random_range(120..450),
        rng.random_range(131..146),
        rng.random_range(3.2..5.4f64),
        rng.random_range(50..160),
        rng.random_range(1..120)
    )
}

impl Identity {
    fn random<R: Rng + ?Sized>(rng: &mut R) -> Self {
        let (female, first, last) = random_person(rng);
        let fmt = *[DateFormat::Iso, DateFormat::Dmy, DateFormat::Long]
            .choose(rng)
            .expect("non-empty");
        let dob = random_date(rng, 1930..=2005).format(fmt);
        let visit = random_date(rng, 2018..=2024);
        let later = add_days(visit, rng.random_range(1..=30));
        let email = random_email(rng, &first, &last);
        let mut doctor = random_doctor(rng);
        let mut doctor2 = random_doctor(rng);
        // Avoid doctors that share the patient's surname (would blur NAME vs DOCTOR).
        while doctor.contains(&last) {
            doctor = random_doctor(rng);
        }
        while doctor2.contains(&last) || doctor2 == doctor {
            doctor2 = random_doctor(rng);
        }
        Identity {
            female,
            dob,
            date: visit.format(fmt),
            date2: later.format(fmt),
            mrn: random_mrn(rng),
            phone: random_phone(rng),
            email,
            address: random_address(rng),
            city: pick(rng, CITIES).to_string(),
            doctor,
            doctor2,
            ward: random_ward(rng),
            hospital: random_hospital(rng),
            diagnosis: pick(rng, DIAGNOSES).to_string(),
            first,
            last,
        }
    }

    /// `(label, value)` for span keys, `(None, value)` for plain keys.
    fn render_key<R: Rng + ?Sized>(
        &self,
        key: &str,
        rng: &mut R,
    ) -> (Option<&'static str>, String) {
        let span = |label: &'static str, v: &str| (Some(label), v.to_string());
        let plain = |v: &str| (None, v.to_string());
        match key {
            "NAME" => span("NAME", &format!("{} {}", self.first, self.last)),
            "FIRST" => span("NAME", &self.first),
            "LAST" => span("NAME", &self.last),
            "DOB" => span("DATE", &self.dob),
            "DATE" => span("DATE", &self.date),
            "DATE2" => span("DATE", &self.date2),
            "MRN" => span("MRN", &self.mrn),
            "PHONE" => span("PHONE", &self.phone),
            "EMAIL" => span("EMAIL", &self.email),
            "ADDRESS" => span("ADDRESS", &self.address),
            "CITY" => span("CITY", &self.city),
            "DOCTOR" => span("DOCTOR", &self.doctor),
            "DOCTOR2" => span("DOCTOR", &self.doctor2),
            "WARD" => span("WARD", &self.ward),
            "HOSPITAL" => span("HOSPITAL", &self.hospital),
            "DIAGNOSIS" => span("DIAGNOSIS", &self.diagnosis),
            "TITLE" => plain(if self.female { "Ms." } else { "Mr." }),
            "PRON" => plain(if self.female { "she" } else { "he" }),
            "PRON_CAP" => plain(if self.female { "She" } else { "He" }),
            "POSS" => plain(if self.female { "her" } else { "his" }),
            "CLINICAL" => plain(pick(rng, CLINICAL)),
            "LABS" => plain(&random_labs(rng)),
            other => panic!("unknown template key {{{other}}}"),
        }
    }
}

/// Accumulates text and spans, tracking the length in chars.
struct Builder {
    text: String,
    chars: usize,
    spans: Vec<Span>,
}

impl Builder {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.chars += s.chars().count();
    }

    fn push_span(&mut self, label: &str, value: &str) {
        let start = self.chars;
        self.push(value);
        self.spans.push(Span {
            start,
            end: self.chars,
            label: label.to_string(),
        });
    }
}

fn render<R: Rng + ?Sized>(template: &str, id: &Identity, rng: &mut R) -> (String, Vec<Span>) {
    let mut b = Builder {
        text: String::with_capacity(template.len() * 2),
        chars: 0,
        spans: Vec::new(),
    };
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        b.push(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .map(|i| open + i)
            .expect("unclosed template key");
        match id.render_key(&rest[open + 1..close], rng) {
            (Some(label), value) => b.push_span(label, &value),
            (None, value) => b.push(&value),
        }
        rest = &rest[close + 1..];
    }
    b.push(rest);
    (b.text, b.spans)
}

/// All templates, grouped by note type.
const NOTE_TYPES: &[&[&str]] = &[DISCHARGE, CONSULT, LAB, REFERRAL];

/// Generate `cfg.n_notes` synthetic clinical notes, deterministically under `cfg.seed`.
/// Ids are `{id_prefix}{index:04}`; spans are sorted, non-overlapping, in char offsets.
pub fn generate_notes(cfg: &SynthConfig) -> Vec<Document> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    (0..cfg.n_notes)
        .map(|i| {
            let kind = pick_list(&mut rng, NOTE_TYPES);
            let template = pick(&mut rng, kind);
            let identity = Identity::random(&mut rng);
            let (text, spans) = render(template, &identity, &mut rng);
            Document {
                id: format!("{}{:04}", cfg.id_prefix, i),
                text,
                spans,
            }
        })
        .collect()
}

fn pick_list<'a, R: Rng + ?Sized>(
    rng: &mut R,
    list: &'a [&'a [&'static str]],
) -> &'a [&'static str] {
    list.choose(rng).expect("non-empty")
}

/// The primary sensitive-file format: one JSON object per line,
/// `{"id": ..., "text": ..., "spans": [{"start": .., "end": .., "label": ..}, ...]}`.
pub fn notes_to_jsonl(docs: &[Document]) -> String {
    let mut out = String::new();
    for doc in docs {
        out.push_str(&serde_json::to_string(doc).expect("Document serializes"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn cfg(n: usize, seed: u64) -> SynthConfig {
        SynthConfig {
            n_notes: n,
            seed,
            id_prefix: "t-".into(),
        }
    }

    fn span_text(doc: &Document, s: &Span) -> String {
        doc.text
            .chars()
            .skip(s.start)
            .take(s.end - s.start)
            .collect()
    }

    #[test]
    fn deterministic_under_seed() {
        let a = generate_notes(&cfg(30, 7));
        let b = generate_notes(&cfg(30, 7));
        assert_eq!(a, b);
        assert_eq!(a.len(), 30);
        assert_eq!(a[0].id, "t-0000");
        assert_eq!(a[29].id, "t-0029");
        let c = generate_notes(&cfg(30, 8));
        assert_ne!(a, c);
    }

    #[test]
    fn spans_are_valid_char_offsets() {
        let all_names: BTreeSet<&str> = FIRST_NAMES_F
            .iter()
            .chain(FIRST_NAMES_M)
            .chain(LAST_NAMES)
            .copied()
            .collect();
        for doc in generate_notes(&cfg(200, 1)) {
            let n_chars = doc.text.chars().count();
            let mut prev_end = 0;
            for s in &doc.spans {
                assert!(s.start < s.end && s.end <= n_chars, "{doc:?}");
                assert!(s.start >= prev_end, "sorted, non-overlapping");
                prev_end = s.end;
                let v = span_text(&doc, s);
                assert_eq!(v.trim(), v, "no surrounding whitespace: {v:?}");
                assert!(LABELS.contains(&s.label.as_str()));
                match s.label.as_str() {
                    "NAME" => assert!(
                        all_names.contains(v.as_str())
                            || v.split_once(' ').is_some_and(
                                |(f, l)| all_names.contains(f) && all_names.contains(l)
                            ),
                        "{v}"
                    ),
                    "DOCTOR" => assert!(v.starts_with("Dr. "), "{v}"),
                    "DIAGNOSIS" => assert!(DIAGNOSES.contains(&v.as_str())),
                    "CITY" => assert!(CITIES.contains(&v.as_str())),
                    "EMAIL" => assert!(v.contains('@') && v.is_ascii()),
                    "DATE" => assert!(v.chars().any(|c| c.is_ascii_digit())),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn offsets_match_rendered_values_with_multibyte_text() {
        // Regenerate one identity and check each span against the value that was spliced in.
        let mut rng = StdRng::seed_from_u64(3);
        let mut id = Identity::random(&mut rng);
        id.first = "Zoë".into();
        id.last = "Müller".into();
        id.city = "Źródła".into();
        let (text, spans) = render(LAB[0], &id, &mut rng);
        let doc = Document {
            id: "x".into(),
            text,
            spans,
        };
        let names: Vec<String> = doc
            .spans
            .iter()
            .filter(|s| s.label == "NAME")
            .map(|s| span_text(&doc, s))
            .collect();
        assert_eq!(names, vec!["Zoë Müller".to_string(), "Müller".to_string()]);
        let mrn = doc.spans.iter().find(|s| s.label == "MRN").unwrap();
        assert_eq!(span_text(&doc, mrn), id.mrn);
        let diag = doc.spans.iter().find(|s| s.label == "DIAGNOSIS").unwrap();
        // The lab values (with "×10⁹" and "µmol") come before this span.
        assert_eq!(span_text(&doc, diag), id.diagnosis);
    }

    #[test]
    fn all_labels_covered_and_names_recur() {
        let docs = generate_notes(&cfg(50, 11));
        let seen: BTreeSet<&str> = docs
            .iter()
            .flat_map(|d| d.spans.iter().map(|s| s.label.as_str()))
            .collect();
        for l in LABELS {
            assert!(seen.contains(l), "label {l} missing");
        }
        let kinds: BTreeSet<&str> = docs
            .iter()
            .map(|d| d.text.lines().next().unwrap_or(""))
            .collect();
        assert!(kinds.len() > 5, "template variety");
        for d in &docs {
            let n_name = d.spans.iter().filter(|s| s.label == "NAME").count();
            assert!((2..=4).contains(&n_name), "{n_name} names in {}", d.text);
            let words = d.text.split_whitespace().count();
            assert!((60..=150).contains(&words), "{words} words: {}", d.text);
        }
    }

    #[test]
    fn every_template_renders() {
        let mut rng = StdRng::seed_from_u64(5);
        for kind in NOTE_TYPES {
            for t in *kind {
                let id = Identity::random(&mut rng);
                let (text, spans) = render(t, &id, &mut rng);
                assert!(!text.contains('{') && !text.contains('}'));
                assert!(spans.iter().filter(|s| s.label == "NAME").count() >= 2);
            }
        }
    }

    #[test]
    fn seeds_give_different_identifiers() {
        let names = |seed| -> BTreeSet<String> {
            generate_notes(&cfg(50, seed))
                .iter()
                .flat_map(|d| {
                    d.spans
                        .iter()
                        .filter(|s| s.label == "NAME" && span_text(d, s).contains(' '))
                        .map(|s| span_text(d, s))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (a, b) = (names(1), names(2));
        assert!(a.len() > 40, "diverse names: {}", a.len());
        let common = a.intersection(&b).count();
        assert!(common * 10 < a.len(), "{common} common of {}", a.len());
        let mrns = |seed| -> BTreeSet<String> {
            generate_notes(&cfg(50, seed))
                .iter()
                .flat_map(|d| {
                    d.spans
                        .iter()
                        .filter(|s| s.label == "MRN")
                        .map(|s| span_text(d, s))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        assert!(mrns(1).is_disjoint(&mrns(2)));
    }

    #[test]
    fn jsonl_roundtrip() {
        let docs = generate_notes(&cfg(5, 9));
        let jsonl = notes_to_jsonl(&docs);
        assert_eq!(jsonl.lines().count(), 5);
        let back: Vec<Document> = jsonl
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, docs);
        let v: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
        assert!(v["id"].is_string() && v["text"].is_string());
        assert!(v["spans"][0]["start"].is_u64() && v["spans"][0]["label"].is_string());
    }

    #[test]
    fn name_lists_sizes() {
        assert_eq!(FIRST_NAMES_F.len() + FIRST_NAMES_M.len(), 100);
        assert_eq!(LAST_NAMES.len(), 100);
        let unique: BTreeSet<&str> = LAST_NAMES.iter().copied().collect();
        assert_eq!(unique.len(), 100);
    }
}
