"""ImageNet-Segmentation class names and the concept word we give each one.

`gtsegs_ijcv.mat` (Guillaumin et al., IJCV 2014) names each image only by its WordNet id (`n02105162_7406`). The
official ConceptAttention evaluation turns the id into the synset's first lemma with NLTK's WordNet and then into one of
72 short words through a hand-made JSON (`imagenet_class_map.json`). We ship both steps as plain tables, so a run needs
neither NLTK nor a download:

- `WNID_NAMES`: WordNet id -> first lemma, for every ImageNet-21k synset whose first lemma is one of the 445 class
  names of the dataset (490 ids: a few names, e.g. "monitor", "Angora", "charger", are the first lemma of several
  synsets; every one is listed, and they share the name, as they do in the official pipeline). Read from the ImageNet
  synset-to-lemma list that ships with the `timm` package.
- `CONCEPT_GROUPS`: concept word -> the class names it stands for. Written by us, one judgement per class: the most
  common everyday word that names what the photo shows ("malinois" -> dog, "gnu" -> antelope, "barrow" (a
  wheelbarrow) -> cart). It covers the same 445 names as the official map and agrees with it on 276 of them; it
  differs mostly where the official map uses a catch-all ("animal" for antelopes, civets) or a near synonym ("cattle"
  for cow, "ferret" for weasels). Fossil hominids map to "skull", people to "human" (not "person", which is one of the
  protocol's background words). Pass `--class-map FILE.json` to the runner to use another map.
"""

CONCEPT_GROUPS: dict[str, str] = {
    "dog": "affenpinscher; American Staffordshire terrier; Australian terrier; basset; beagle; Belgian sheepdog; "
    "bloodhound; briard; coonhound; dhole; dingo; Doberman; foxhound; giant schnauzer; groenendael; Irish wolfhound; "
    "Italian greyhound; komondor; Lakeland terrier; malinois; miniature pinscher; miniature schnauzer; otterhound; "
    "pinscher; pup; puppy; redbone; schipperke; Scottish deerhound; Sealyham terrier; Staffordshire bullterrier; "
    "staghound; standard schnauzer; Walker hound; Welsh terrier; whippet; wolfhound",
    "cat": "Angora; bobcat; Canada lynx; caracal; cougar; liger; lynx; margay; tabby",
    "lion": "lion; lioness; lionet",
    "tiger": "tiger; tiger cub",
    "leopard": "jaguar; leopard",
    "horse": "bronco; bucking bronco; carthorse; cavalry horse; charger; Clydesdale; coach horse; draft horse; dun; "
    "Exmoor; gelding; packhorse; pacer; Percheron; pole horse; shire; steeplechaser; stud; warhorse",
    "donkey": "African wild ass; burro; chigetai; domestic ass; jennet; moke; onager; wild ass",
    "cow": "Aberdeen Angus; anoa; banteng; beef; bull; bullock; carabao; Charolais; cow; Durham; Galloway; gaur; "
    "gayal; Hereford; Indian buffalo; longhorn; ox; Santa Gertrudis; water buffalo",
    "sheep": "aoudad; argali; bighorn; broadtail; domestic sheep; Hampshire; longwool; mouflon; mountain sheep; "
    "Rambouillet; wether",
    "goat": "goral; serow; takin",
    "deer": "barren ground caribou; brocket; elk; hind; muntjac; red deer; roe deer; roebuck; sambar; wapiti; "
    "woodland caribou",
    "antelope": "blackbuck; bongo; bushbuck; common eland; dik-dik; eland; Gazella subgutturosa; gazelle; gemsbok; "
    "giant eland; gnu; greater kudu; harnessed antelope; hartebeest; impala; kob; kudu; lechwe; lesser kudu; nilgai; "
    "nyala; oryx; puku; sassaby; springbok; steenbok; Thomson's gazelle; waterbuck",
    "pig": "hog; warthog; wild boar",
    "rabbit": "Belgian hare; blacktail jackrabbit; bunny; eastern cottontail; European hare; European rabbit; hare; "
    "jackrabbit; lapin; leveret; marsh hare; polar hare; snowshoe hare; swamp rabbit; white-tailed jackrabbit; "
    "rabbit; wood rabbit",
    "squirrel": "American red squirrel; antelope squirrel; Arctic ground squirrel; black squirrel; chickeree; "
    "chipmunk; eastern grey squirrel; flickertail; fox squirrel; ground squirrel; mantled ground squirrel; "
    "red squirrel; rock squirrel; suslik; tree squirrel; western grey squirrel",
    "mouse": "loir; lerot",
    "bat": "big brown bat; cave myotis; eastern pipistrel; freetail; frosted bat; guano bat; jackass bat; "
    "little brown bat; long-eared bat; pallid bat; pipistrelle; pocketed bat; red bat; serotine; vespertilian bat; "
    "western big-eared bat",
    "kangaroo": "bettong; common wallaby; giant kangaroo; hare wallaby; jerboa kangaroo; musk kangaroo; "
    "nail-tailed wallaby; potoroo; rat kangaroo; rock wallaby; tree wallaby; wallaby",
    "possum": "brush-tailed phalanger; cuscus; flying phalanger; phalanger",
    "koala": "koala",
    "wombat": "wombat",
    "animal": "dasyure; eastern dasyure; native cat; numbat; rabbit-eared bandicoot; Tasmanian devil; thylacine",
    "weasel": "American marten; American mink; black-footed ferret; ermine; ferret; fisher; longtail weasel; marten; "
    "muishond; New World least weasel; Old World least weasel; pine marten; sable; snake muishond; stoat; "
    "stone marten; tayra; weasel; yellow-throated marten",
    "badger": "American badger; badger; Eurasian badger; hog badger; ratel",
    "otter": "Eurasian otter; otter",
    "skunk": "hog-nosed skunk; hooded skunk; skunk; spotted skunk",
    "civet": "banded palm civet; binturong; fanaloka; large civet; palm cat; small civet",
    "mongoose": "ichneumon; Indian mongoose; mongoose",
    "meerkat": "meerkat; slender-tailed meerkat; suricate",
    "raccoon": "bassarisk; coati; common raccoon; raccoon",
    "panda": "lesser panda",
    "monkey": "baboon; Barbary ape; bonnet macaque; chacma; colobus; entellus; galago; green monkey; grivet; guenon; "
    "guereza; indri; macaque; patas; pygmy marmoset; rhesus; silky tamarin; tamarin; true marmoset; vervet",
    "gorilla": "gorilla; silverback; western lowland gorilla",
    "orangutan": "orangutan",
    "human": "Cro-magnon; Homo sapiens; Homo sapiens sapiens",
    "skull": "australopithecine; Australopithecus afarensis; Australopithecus africanus; Homo erectus; Java man; "
    "Paranthropus; Peking man; Zinjanthropus",
    "whale": "bowhead; finback; killer whale; lesser rorqual; rorqual; sei whale",
    "dolphin": "harbor porpoise; porpoise; vaquita",
    "manatee": "dugong; manatee",
    "anteater": "ant bear; silky anteater; tamandua",
    "armadillo": "apar; armadillo; giant armadillo; peba; peludo; pichiciago",
    "echidna": "echidna",
    "platypus": "platypus",
    "snake": "asp",
    "monitor": "monitor",
    "plane": "airbus; airliner; biplane; bomber; dive bomber; fighter; floatplane; flying boat; interceptor; jet; "
    "jumbojet; monoplane; narrowbody aircraft; propeller plane; propjet; seaplane; single prop; ski-plane; "
    "stealth bomber; stealth fighter; widebody aircraft",
    "propeller": "airplane propeller; variable-pitch propeller",
    "balloon": "balloon; barrage balloon; hot-air balloon; kite balloon; meteorological balloon; trial balloon",
    "airship": "airship; blimp",
    "boat": "catamaran; catboat; sailboat; trimaran",
    "truck": "delivery truck; milk float; pantechnicon",
    "van": "bookmobile; minivan; moving van; passenger van; van",
    "cart": "barrow",
    "computer": "briefcase computer; computer; desktop computer; hand-held computer; notebook; portable computer",
    "screen": "computer screen; touch screen",
    "television": "cable television; high-definition television",
    "microphone": "cardioid microphone; condenser microphone; crystal microphone; directional microphone; microphone",
    "speaker": "bullhorn; squawk box; subwoofer; tannoy; woofer",
    "radio": "radio",
    "drum": "bass drum; drum; tambourine",
    "xylophone": "marimba",
    "horn": "bass horn; euphonium; French horn; helicon",
    "ball": "baseball; basketball; eight ball; pool ball; soccer ball",
    "glove": "baseball glove",
    "racket": "badminton racket; racket; squash racket; tennis racket",
    "mallet": "croquet mallet; mallet; polo mallet",
    "cue": "cue",
    "trapeze": "trapeze",
    "latch": "catch; hasp; hood latch; latch",
    "hook": "hook",
    "screw": "screw",
    "buckle": "belt buckle",
    "button": "button; coat button",
    "book": "planner",
    "candle": "candle; chandlery; rushlight; vigil light",
    "streetlight": "streetlight",
    "basket": "basket",
    "barrel": "rain barrel",
    "tank": "cesspool; cistern",
    "mask": "oxygen mask",
}

WNID_NAMES_TEXT = """
n00471613 baseball; n00480993 basketball; n01322343 pup; n01322604 puppy; n01323068 tiger cub;
n01694709 monitor; n01748389 asp; n01752736 asp; n01872401 echidna; n01872772 echidna; n01873310 platypus;
n01876667 rabbit-eared bandicoot; n01877606 giant kangaroo; n01877812 wallaby; n01878061 common wallaby;
n01878335 hare wallaby; n01878639 nail-tailed wallaby; n01878929 rock wallaby; n01879509 tree wallaby;
n01879837 musk kangaroo; n01880152 rat kangaroo; n01880473 potoroo; n01880716 bettong;
n01880813 jerboa kangaroo; n01881171 phalanger; n01881564 cuscus; n01881857 brush-tailed phalanger;
n01882125 flying phalanger; n01882714 koala; n01883070 wombat; n01883920 dasyure; n01884104 eastern dasyure;
n01884203 native cat; n01884476 thylacine; n01884834 Tasmanian devil; n01885498 numbat; n01887623 bull;
n01887787 cow; n02064000 bowhead; n02064338 rorqual; n02065026 finback; n02065263 sei whale;
n02065407 lesser rorqual; n02070430 porpoise; n02070624 harbor porpoise; n02070776 vaquita;
n02071294 killer whale; n02073831 manatee; n02074367 dugong; n02088238 basset; n02088364 beagle;
n02088466 bloodhound; n02088839 coonhound; n02089555 foxhound; n02089867 Walker hound; n02090379 redbone;
n02090475 wolfhound; n02090721 Irish wolfhound; n02091032 Italian greyhound; n02091134 whippet;
n02091635 otterhound; n02092002 Scottish deerhound; n02092173 staghound; n02093256 Staffordshire bullterrier;
n02093428 American Staffordshire terrier; n02095570 Lakeland terrier; n02095727 Welsh terrier;
n02095889 Sealyham terrier; n02096294 Australian terrier; n02097047 miniature schnauzer;
n02097130 giant schnauzer; n02097209 standard schnauzer; n02104365 schipperke; n02104882 Belgian sheepdog;
n02105056 groenendael; n02105162 malinois; n02105251 briard; n02105505 komondor; n02106966 pinscher;
n02107142 Doberman; n02107312 miniature pinscher; n02110627 affenpinscher; n02115641 dingo; n02115913 dhole;
n02122878 tabby; n02123045 tabby; n02123478 Angora; n02125311 cougar; n02126640 margay; n02127052 lynx;
n02127381 Canada lynx; n02127482 bobcat; n02127678 caracal; n02128385 leopard; n02128925 jaguar;
n02129165 lion; n02129463 lioness; n02129530 lionet; n02129604 tiger; n02129991 liger; n02135610 large civet;
n02135844 small civet; n02136103 binturong; n02136794 fanaloka; n02137302 banded palm civet;
n02137549 mongoose; n02137722 Indian mongoose; n02137888 ichneumon; n02138169 palm cat; n02138441 meerkat;
n02138647 slender-tailed meerkat; n02138777 suricate; n02145424 vespertilian bat; n02145910 frosted bat;
n02146201 red bat; n02146700 little brown bat; n02146879 cave myotis; n02147173 big brown bat;
n02147328 serotine; n02147591 pallid bat; n02147947 pipistrelle; n02148088 eastern pipistrel;
n02148512 jackass bat; n02148835 long-eared bat; n02148991 western big-eared bat; n02149420 freetail;
n02149653 guano bat; n02149861 pocketed bat; n02324045 rabbit; n02324514 lapin; n02324587 bunny;
n02324850 European rabbit; n02325366 wood rabbit; n02325722 eastern cottontail; n02325884 swamp rabbit;
n02326074 marsh hare; n02326432 hare; n02326763 leveret; n02326862 European hare; n02327028 jackrabbit;
n02327175 white-tailed jackrabbit; n02327435 blacktail jackrabbit; n02327656 polar hare;
n02327842 snowshoe hare; n02328009 Belgian hare; n02328150 Angora; n02352932 loir; n02353411 lerot;
n02355477 tree squirrel; n02356381 eastern grey squirrel; n02356612 western grey squirrel;
n02356798 fox squirrel; n02356977 black squirrel; n02357111 red squirrel; n02357401 American red squirrel;
n02357585 chickeree; n02357911 antelope squirrel; n02358091 ground squirrel; n02358390 mantled ground squirrel;
n02358584 suslik; n02358712 flickertail; n02358890 rock squirrel; n02359047 Arctic ground squirrel;
n02360282 chipmunk; n02377291 stud; n02377388 gelding; n02378415 warhorse; n02378541 cavalry horse;
n02378625 charger; n02380745 bronco; n02380875 bucking bronco; n02381261 dun; n02382850 Exmoor;
n02384741 steeplechaser; n02386496 draft horse; n02386746 packhorse; n02386853 carthorse; n02386968 Clydesdale;
n02387093 Percheron; n02387346 shire; n02387452 pole horse; n02387887 coach horse; n02387983 pacer;
n02388143 pacer; n02388453 pole horse; n02389559 domestic ass; n02389779 burro; n02389865 moke;
n02390015 jennet; n02390454 wild ass; n02390640 African wild ass; n02390834 onager; n02390938 chigetai;
n02395406 hog; n02396427 wild boar; n02397096 warthog; n02402175 ox; n02403003 ox; n02403231 bullock;
n02403325 bull; n02403454 cow; n02403820 bullock; n02404186 beef; n02404432 longhorn; n02405440 banteng;
n02405799 Santa Gertrudis; n02405929 Aberdeen Angus; n02406647 Charolais; n02407071 Durham; n02407276 Galloway;
n02407625 Hereford; n02408429 water buffalo; n02408660 Indian buffalo; n02408817 carabao; n02409038 anoa;
n02410011 gaur; n02410141 gayal; n02412210 wether; n02412787 hog; n02413131 domestic sheep;
n02413593 Hampshire; n02413824 Exmoor; n02414043 broadtail; n02414209 longwool; n02414442 Rambouillet;
n02414763 argali; n02415435 mountain sheep; n02415577 bighorn; n02415829 mouflon; n02416104 aoudad;
n02417387 Angora; n02418770 goral; n02419056 serow; n02419634 takin; n02420509 blackbuck; n02421449 gnu;
n02421792 dik-dik; n02422106 hartebeest; n02422391 sassaby; n02422699 impala; n02423022 gazelle;
n02423218 Thomson's gazelle; n02423362 Gazella subgutturosa; n02423589 springbok; n02424085 bongo;
n02424305 kudu; n02424486 greater kudu; n02424589 lesser kudu; n02424695 harnessed antelope; n02424909 nyala;
n02425228 bushbuck; n02425532 nilgai; n02426481 steenbok; n02426813 eland; n02427032 common eland;
n02427183 giant eland; n02427470 kob; n02427576 lechwe; n02427724 waterbuck; n02428089 puku; n02428349 oryx;
n02428508 gemsbok; n02431122 red deer; n02431441 hind; n02431542 brocket; n02431628 sambar; n02431785 wapiti;
n02432983 elk; n02433546 roe deer; n02433729 roebuck; n02434190 woodland caribou;
n02434415 barren ground caribou; n02434712 brocket; n02434954 muntjac; n02441942 weasel; n02442172 ermine;
n02442336 stoat; n02442446 New World least weasel; n02442572 Old World least weasel; n02442668 longtail weasel;
n02443015 American mink; n02443346 ferret; n02443484 black-footed ferret; n02443808 muishond;
n02443959 snake muishond; n02444819 otter; n02445171 Eurasian otter; n02445715 skunk; n02446352 hooded skunk;
n02446645 hog-nosed skunk; n02447021 spotted skunk; n02447366 badger; n02447762 American badger;
n02448060 Eurasian badger; n02448318 ratel; n02448885 hog badger; n02450034 marten; n02450295 pine marten;
n02450426 sable; n02450561 American marten; n02450677 stone marten; n02450829 fisher;
n02451125 yellow-throated marten; n02451415 tayra; n02454379 armadillo; n02454794 peba; n02455135 apar;
n02455720 peludo; n02456008 giant armadillo; n02456275 pichiciago; n02460451 ant bear;
n02460817 silky anteater; n02461128 tamandua; n02473307 Homo erectus; n02473720 Java man; n02473857 Peking man;
n02474777 Homo sapiens; n02475358 Cro-magnon; n02475669 Homo sapiens sapiens; n02476219 australopithecine;
n02476567 Australopithecus afarensis; n02476870 Australopithecus africanus; n02477187 Zinjanthropus;
n02477516 Paranthropus; n02480495 orangutan; n02480855 gorilla; n02481103 western lowland gorilla;
n02481500 silverback; n02484975 guenon; n02485371 grivet; n02485536 vervet; n02485688 green monkey;
n02486261 patas; n02486410 baboon; n02486657 chacma; n02487347 macaque; n02487547 rhesus;
n02487675 bonnet macaque; n02487847 Barbary ape; n02488415 entellus; n02488702 colobus; n02488894 guereza;
n02490597 true marmoset; n02490811 pygmy marmoset; n02491107 tamarin; n02491329 silky tamarin;
n02499808 galago; n02500267 indri; n02508021 raccoon; n02508213 common raccoon; n02508742 bassarisk;
n02509515 coati; n02509815 lesser panda; n02569484 hind; n02686121 airbus; n02690373 airliner;
n02692086 airplane propeller; n02692877 airship; n02772700 badminton racket; n02782093 balloon;
n02794972 barrage balloon; n02797295 barrow; n02799071 baseball; n02800213 baseball glove; n02801938 basket;
n02802215 basket; n02802426 basketball; n02803666 bass drum; n02804252 bass horn; n02828299 belt buckle;
n02842573 biplane; n02850950 blimp; n02867715 bomber; n02869737 bongo; n02871314 bookmobile;
n02900987 briefcase computer; n02917377 bullhorn; n02928608 button; n02948072 candle;
n02963692 cardioid microphone; n02981792 catamaran; n02982416 catboat; n02982599 catch; n02998563 cesspool;
n03005515 chandlery; n03008976 charger; n03035510 cistern; n03035715 cistern; n03057541 coat button;
n03082979 computer; n03085602 computer screen; n03087816 condenser microphone; n03135030 croquet mallet;
n03143572 crystal microphone; n03145522 cue; n03173929 delivery truck; n03180011 desktop computer;
n03205143 directional microphone; n03215191 dive bomber; n03249569 drum; n03249956 drum; n03267113 eight ball;
n03301568 euphonium; n03335030 fighter; n03365231 floatplane; n03373611 flying boat; n03394916 French horn;
n03485407 hand-held computer; n03497352 hasp; n03512030 helicon; n03531982 hood latch; n03532342 hook;
n03532672 hook; n03532919 hook; n03541923 hot-air balloon; n03577672 interceptor; n03595860 jet;
n03604311 jumbojet; n03621694 kite balloon; n03644858 latch; n03645011 latch; n03715386 mallet;
n03715669 mallet; n03715892 mallet; n03721384 marimba; n03752922 meteorological balloon; n03759954 microphone;
n03764822 milk float; n03770679 minivan; n03781787 monitor; n03782006 monitor; n03782190 monitor;
n03783873 monoplane; n03796401 moving van; n03809312 narrowbody aircraft; n03832673 notebook;
n03868863 oxygen mask; n03884639 pantechnicon; n03896419 passenger van; n03956785 planner;
n03978686 polo mallet; n03982232 pool ball; n03985232 portable computer; n04012084 propeller plane;
n04012482 propjet; n04039381 racket; n04041544 radio; n04049303 rain barrel; n04121228 rushlight;
n04122262 sable; n04122349 sable; n04128499 sailboat; n04153751 screw; n04154152 screw; n04154340 screw;
n04160586 seaplane; n04222723 single prop; n04230487 ski-plane; n04254680 soccer ball; n04292414 squash racket;
n04292572 squawk box; n04308273 stealth bomber; n04308397 stealth fighter; n04335886 streetlight;
n04349401 subwoofer; n04387400 tambourine; n04390873 tannoy; n04409806 tennis racket; n04458843 touch screen;
n04475411 trapeze; n04480527 trial balloon; n04483307 trimaran; n04520170 van; n04520382 van;
n04521571 variable-pitch propeller; n04534895 vigil light; n04583620 widebody aircraft; n04599124 woofer;
n06277135 radio; n06278338 cable television; n06278475 high-definition television; n07697825 bomber;
n09878921 bull; n09880189 bunny; n09972587 cow; n10438172 planner; n10493835 puppy; n10665587 stud;
n13869547 hook; n14765422 leopard;
"""


def _parse_names(text: str) -> dict[str, str]:
    pairs = (item.strip().split(" ", 1) for item in text.replace("\n", " ").split(";") if item.strip())
    return {wnid: name for wnid, name in pairs}


WNID_NAMES: dict[str, str] = _parse_names(WNID_NAMES_TEXT)
CLASS_CONCEPTS: dict[str, str] = {
    name: concept for concept, names in CONCEPT_GROUPS.items() for name in names.split("; ")
}
