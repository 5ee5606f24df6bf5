#!/usr/bin/env bash
# Regenerates kjv.txt.gz (the shipped training corpus) from Debian's bible-kjv package.
# Format (see README.md): one document per chapter; a document is a title line ("Genesis 1")
# followed by one line per verse; documents are separated by one empty line.
set -euo pipefail
cd "$(dirname "$0")"
command -v bible >/dev/null || { echo "make-kjv.sh: needs the 'bible' command (apt-get install bible-kjv)" >&2; exit 1; }

# bible prints "Ge1:1 In the beginning ..." per verse; abbreviations in canonical order.
abbrevs="Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv
Eccl SSol Isa Jer Lam Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal
Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas
1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev"
names="Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|\
1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|\
Isaiah|Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|\
Zephaniah|Haggai|Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|1 Corinthians|2 Corinthians|\
Galatians|Ephesians|Philippians|Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|2 Timothy|\
Titus|Philemon|Hebrews|James|1 Peter|2 Peter|1 John|2 John|3 John|Jude|Revelation"

bible -f "Genesis 1:1-Revelation 22:21" \
| LC_ALL=C awk -v abbrevs="$abbrevs" -v names="$names" '
    BEGIN {
        n = split(abbrevs, a, /[ \n]+/); m = split(names, b, "|")
        if (n != 66 || m != 66) { print "book tables must have 66 entries" > "/dev/stderr"; exit 1 }
        for (i = 1; i <= n; i++) full[a[i]] = b[i]
    }
    {
        if (!match($0, /^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ /)) { print "unexpected line " NR ": " $0 > "/dev/stderr"; exit 1 }
        ref = substr($0, 1, RLENGTH - 1); text = substr($0, RLENGTH + 1)
        match(ref, /^[0-9]?[A-Za-z]+/); book = substr(ref, 1, RLENGTH)
        chapter = substr(ref, RLENGTH + 1); sub(/:.*/, "", chapter)
        if (!(book in full)) { print "unknown book " book > "/dev/stderr"; exit 1 }
        key = book " " chapter
        if (key != last) { if (NR > 1) print ""; print full[book] " " chapter; last = key; docs++ }
        print text
    }
    END { if (docs != 1189) { print "expected 1189 chapters, got " docs > "/dev/stderr"; exit 1 } }' \
> kjv.txt.tmp
gzip -9 -n -c kjv.txt.tmp > kjv.txt.gz
rm kjv.txt.tmp
echo "wrote $(pwd)/kjv.txt.gz ($(stat -c %s kjv.txt.gz) bytes)"
