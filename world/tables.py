"""Reference tables of the sample world: species, countries, regions, licenses, observers.

Owns: the built-in species list (real Latin names with a native-range group and a common name), the
country spread of each group, country names and sub-national regions as exports spell them, the
license spelling table (importable by tests elsewhere) and the license mix, and the word lists the
synthetic binomials are built from.

Leaves out: all randomness and record building (``generate.py``). Shares and weights are plausible
orders of magnitude for an iNaturalist-style export, not measurements.
"""

from __future__ import annotations

# Data tables stay compact, one logical row per line.
# fmt: off
# (Latin name, native-range group, common name). Ordered so that the default 40 species mix
# Mediterranean (the majority), European, American, Asian, and Australian plants.
SPECIES: tuple[tuple[str, str, str], ...] = (
    ("Quercus ilex", "mediterranean", "holm oak"),
    ("Olea europaea", "mediterranean", "olive"),
    ("Lavandula stoechas", "mediterranean", "French lavender"),
    ("Rosmarinus officinalis", "mediterranean", "rosemary"),
    ("Cistus albidus", "mediterranean", "grey-leaved cistus"),
    ("Pinus pinea", "mediterranean", "stone pine"),
    ("Quercus robur", "european", "pedunculate oak"),
    ("Eschscholzia californica", "north_american", "California poppy"),
    ("Arbutus unedo", "mediterranean", "strawberry tree"),
    ("Pistacia lentiscus", "mediterranean", "mastic"),
    ("Myrtus communis", "mediterranean", "myrtle"),
    ("Fagus sylvatica", "european", "European beech"),
    ("Acer palmatum", "asian", "Japanese maple"),
    ("Nerium oleander", "mediterranean", "oleander"),
    ("Quercus suber", "mediterranean", "cork oak"),
    ("Cistus monspeliensis", "mediterranean", "Montpellier cistus"),
    ("Digitalis purpurea", "european", "foxglove"),
    ("Rudbeckia hirta", "north_american", "black-eyed Susan"),
    ("Eucalyptus globulus", "australian", "Tasmanian blue gum"),
    ("Thymus vulgaris", "mediterranean", "common thyme"),
    ("Pinus halepensis", "mediterranean", "Aleppo pine"),
    ("Ceratonia siliqua", "mediterranean", "carob"),
    ("Bellis perennis", "european", "common daisy"),
    ("Camellia japonica", "asian", "camellia"),
    ("Chamaerops humilis", "mediterranean", "dwarf fan palm"),
    ("Spartium junceum", "mediterranean", "Spanish broom"),
    ("Calluna vulgaris", "european", "heather"),
    ("Echinacea purpurea", "north_american", "purple coneflower"),
    ("Euphorbia characias", "mediterranean", "Mediterranean spurge"),
    ("Phlomis fruticosa", "mediterranean", "Jerusalem sage"),
    ("Papaver rhoeas", "european", "common poppy"),
    ("Jacaranda mimosifolia", "south_american", "jacaranda"),
    ("Cistus salviifolius", "mediterranean", "sage-leaved rock-rose"),
    ("Quercus coccifera", "mediterranean", "kermes oak"),
    ("Hedera helix", "european", "common ivy"),
    ("Prunus serrulata", "asian", "Japanese cherry"),
    ("Anemone coronaria", "mediterranean", "poppy anemone"),
    ("Juniperus oxycedrus", "mediterranean", "prickly juniper"),
    ("Acer saccharum", "north_american", "sugar maple"),
    ("Acacia dealbata", "australian", "silver wattle"),
    ("Lavandula angustifolia", "mediterranean", "English lavender"),
    ("Smilax aspera", "mediterranean", "rough bindweed"),
    ("Asphodelus ramosus", "mediterranean", "branched asphodel"),
    ("Capparis spinosa", "mediterranean", "caper"),
    ("Betula pendula", "european", "silver birch"),
    ("Taraxacum officinale", "european", "dandelion"),
    ("Urtica dioica", "european", "stinging nettle"),
    ("Leucanthemum vulgare", "european", "oxeye daisy"),
    ("Achillea millefolium", "european", "yarrow"),
    ("Primula vulgaris", "european", "primrose"),
    ("Sambucus nigra", "european", "elder"),
    ("Quercus alba", "north_american", "white oak"),
    ("Sequoia sempervirens", "north_american", "coast redwood"),
    ("Asclepias syriaca", "north_american", "common milkweed"),
    ("Cornus florida", "north_american", "flowering dogwood"),
    ("Opuntia ficus-indica", "north_american", "prickly pear"),
    ("Ginkgo biloba", "asian", "ginkgo"),
    ("Nelumbo nucifera", "asian", "sacred lotus"),
    ("Wisteria sinensis", "asian", "Chinese wisteria"),
    ("Passiflora edulis", "south_american", "passion fruit"),
    ("Banksia integrifolia", "australian", "coast banksia"),
    ("Agave americana", "north_american", "century plant"),
)

# Country spread (ISO 3166-1 alpha-2, relative weight) of observations per native-range group.
# Plants are observed where they grow wild and where they are planted, so spreads overlap.
GROUP_COUNTRIES: dict[str, tuple[tuple[str, float], ...]] = {
    "mediterranean": (("ES", 30), ("IT", 18), ("FR", 14), ("PT", 12), ("GR", 10), ("MA", 5), ("TR", 4),
                      ("HR", 3), ("TN", 2), ("IL", 1), ("CY", 1)),
    "european": (("DE", 20), ("GB", 18), ("FR", 14), ("NL", 8), ("PL", 8), ("SE", 5), ("BE", 4),
                 ("CH", 4), ("AT", 4), ("ES", 4), ("IT", 4), ("DK", 3), ("IE", 3), ("CZ", 3)),
    "north_american": (("US", 70), ("CA", 18), ("MX", 12)),
    "south_american": (("BR", 30), ("AR", 25), ("US", 15), ("ES", 10), ("PT", 10), ("AU", 10)),
    "asian": (("JP", 40), ("CN", 30), ("KR", 15), ("TW", 5), ("US", 5), ("GB", 5)),
    "australian": (("AU", 70), ("PT", 10), ("ES", 8), ("US", 7), ("NZ", 5)),
}
# Every species is also seen, rarely, anywhere gardens are (cultivated plants, misidentifications).
ELSEWHERE_RATE = 0.03
ELSEWHERE_COUNTRIES: tuple[str, ...] = ("US", "GB", "DE", "FR", "ES", "AU", "JP", "BR", "ZA", "IN", "CL")

COUNTRY_NAMES: dict[str, str] = {
    "AR": "Argentina", "AT": "Austria", "AU": "Australia", "BE": "Belgium", "BR": "Brazil",
    "CA": "Canada", "CH": "Switzerland", "CL": "Chile", "CN": "China", "CY": "Cyprus",
    "CZ": "Czech Republic", "DE": "Germany", "DK": "Denmark", "ES": "Spain", "FR": "France",
    "GB": "United Kingdom", "GR": "Greece", "HR": "Croatia", "IE": "Ireland", "IL": "Israel",
    "IN": "India", "IT": "Italy", "JP": "Japan", "KR": "South Korea", "MA": "Morocco", "MX": "Mexico",
    "NL": "Netherlands", "NZ": "New Zealand", "PL": "Poland", "PT": "Portugal", "SE": "Sweden",
    "TN": "Tunisia", "TR": "Turkey", "TW": "Taiwan", "US": "United States", "ZA": "South Africa",
}

# Sub-national regions as exports spell them (local names, accents included).
COUNTRY_REGIONS: dict[str, tuple[str, ...]] = {
    "ES": ("Andalucía", "Catalunya", "Comunitat Valenciana", "Illes Balears", "Región de Murcia",
           "Comunidad de Madrid"),
    "PT": ("Algarve", "Alentejo", "Lisboa"),
    "FR": ("Provence-Alpes-Côte d'Azur", "Occitanie", "Corse", "Île-de-France", "Bretagne"),
    "IT": ("Sicilia", "Sardegna", "Toscana", "Puglia", "Lazio"),
    "GR": ("Kriti", "Attiki", "Peloponnisos"),
    "MA": ("Tanger-Tétouan-Al Hoceïma", "Souss-Massa"),
    "DE": ("Bayern", "Berlin", "Nordrhein-Westfalen"),
    "GB": ("England", "Scotland", "Wales"),
    "US": ("California", "Texas", "Florida", "New York", "Oregon"),
    "CA": ("Ontario", "British Columbia", "Québec"),
    "MX": ("Oaxaca", "Jalisco"),
    "AU": ("New South Wales", "Victoria", "Tasmania"),
    "JP": ("Tokyo", "Kyoto", "Hokkaido"),
    "BR": ("São Paulo", "Minas Gerais"),
}

# Raw license strings as real exports spell them, grouped by license family. Families: the
# Creative Commons family codes in lower case, "pdm" (public domain mark), "all-rights-reserved", and
# "unknown" (strings that say nothing usable, the empty string, and a missing value); the same ids as
# config/licenses.yaml.
LICENSE_SPELLINGS: dict[str, tuple[str | None, ...]] = {
    "cc-by": ("CC-BY 4.0", "cc-by", "CC BY 4.0", "CC BY 2.0", "https://creativecommons.org/licenses/by/4.0/",
              "Attribution"),
    "cc-by-nc": ("CC-BY-NC 4.0", "cc-by-nc", "CC BY-NC 4.0", "CC BY-NC 2.0",
                 "https://creativecommons.org/licenses/by-nc/4.0/", "Attribution-NonCommercial"),
    "cc0": ("cc0", "CC0", "CC0 1.0 Universal", "http://creativecommons.org/publicdomain/zero/1.0/"),
    "pdm": ("public domain", "Public Domain", "http://creativecommons.org/publicdomain/mark/1.0/"),
    "cc-by-sa": ("CC-BY-SA 4.0", "cc-by-sa", "CC BY-SA 3.0", "https://creativecommons.org/licenses/by-sa/4.0/",
                 "Attribution-ShareAlike"),
    "cc-by-nc-sa": ("CC-BY-NC-SA 4.0", "cc-by-nc-sa", "CC BY-NC-SA 3.0",
                    "https://creativecommons.org/licenses/by-nc-sa/4.0/",
                    "Attribution-NonCommercial-ShareAlike"),
    "all-rights-reserved": ("(c) all rights reserved", "All Rights Reserved", "all-rights-reserved", "(c)"),
    "cc-by-nd": ("CC-BY-ND 4.0", "cc-by-nd", "https://creativecommons.org/licenses/by-nd/4.0/"),
    "cc-by-nc-nd": ("CC-BY-NC-ND 4.0", "cc-by-nc-nd", "Attribution-NonCommercial-NoDerivatives"),
    "unknown": ("see website", "unknown", "", None),
}
# Share of records per license family (percent), roughly the mix of an iNaturalist photo export.
LICENSE_WEIGHTS: dict[str, float] = {
    "cc-by-nc": 35, "cc-by": 20, "cc-by-nc-sa": 12, "all-rights-reserved": 12, "cc0": 8, "pdm": 2,
    "cc-by-sa": 8, "cc-by-nd": 1, "cc-by-nc-nd": 1, "unknown": 1,
}

# Genera and epithets for synthetic binomials when a world needs more species than SPECIES holds.
SYNTH_GENERA: tuple[str, ...] = (
    "Acer", "Allium", "Aster", "Berberis", "Campanula", "Carex", "Centaurea", "Clematis", "Crataegus",
    "Dianthus", "Erica", "Euphorbia", "Festuca", "Galium", "Genista", "Geranium", "Helianthemum",
    "Hypericum", "Iris", "Juncus", "Lathyrus", "Linaria", "Lonicera", "Medicago", "Ononis", "Ophrys",
    "Orchis", "Plantago", "Potentilla", "Quercus", "Ranunculus", "Rosa", "Rubus", "Salix", "Salvia",
    "Saxifraga", "Sedum", "Silene", "Teucrium", "Trifolium", "Verbascum", "Veronica", "Vicia", "Viola",
)
SYNTH_EPITHETS: tuple[str, ...] = (
    "alba", "alpina", "angustifolia", "arvensis", "aurea", "australis", "borealis", "caerulea",
    "canescens", "communis", "cretica", "dentata", "elegans", "filiformis", "glabra", "glauca",
    "gracilis", "hirsuta", "hispanica", "humilis", "italica", "latifolia", "lutea", "maritima",
    "minor", "mollis", "montana", "nana", "nigra", "nivalis", "occidentalis", "officinalis",
    "orientalis", "palustris", "pratensis", "pubescens", "pumila", "repens", "rigida", "rubra",
    "rupestris", "sativa", "saxatilis", "sylvestris", "tenuifolia", "tomentosa", "vulgaris", "viridis",
)

OBSERVER_FIRST: tuple[str, ...] = (
    "ana", "marta", "joan", "pierre", "giulia", "nikos", "sofia", "lucas", "emma", "jan", "olga",
    "hiro", "mei", "liam", "carmen", "pedro", "ines", "yusuf", "amira", "tom",
)
OBSERVER_LAST: tuple[str, ...] = (
    "garcia", "rossi", "martin", "silva", "papadopoulos", "muller", "smith", "kowalski", "tanaka",
    "wang", "lopez", "ferrari", "dubois", "costa", "jensen", "benali",
)
LEGACY_COLLECTIONS: tuple[str, ...] = (
    "herbarium-2011", "field-survey-2014", "botanic-garden-catalog", "school-project", "photo-contest-2016",
)
QUALITY_GRADES: tuple[tuple[str, float], ...] = (("research", 75), ("needs_id", 20), ("casual", 5))
PERENUAL_CYCLES: tuple[str, ...] = ("Perennial", "Annual", "Biennial", "Herbaceous Perennial")
# fmt: on
