// The channels-last first passes of S3 = NC (4096, 1024) f32, two threads, cold (a 64 MB
// copy before each call), 30 rounds, the variants alternating round by round: a plain
// read of x (and of x and dy), the f64 shifted statistics of x and the f64 backward sums
// of (x, dy) with the per-channel sums in memory updated once per 4 or 8 rows.
// Outside CI:
//   gcc -O2 -march=native -fopenmp -ffp-contract=off stats_pass.c -o stats_pass && ./stats_pass
// Quoted in bench/RESULTS.md ("Eighth session"): the statistics gain from 8 rows (8
// streams of reads), the backward sums lose (16 streams).
// S3 statistics pass (4096 x 1024 f32, 2 threads, cold): read floor vs f64 shifted sums variants
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define C 1024
#define N 4096
#define TASK 64   /* rows per task */
float *x,*dyv; float *fa,*fb; double sink;
static double acc1[2][C] __attribute__((aligned(64))), acc2[2][C] __attribute__((aligned(64))); double shift[C] __attribute__((aligned(64)));
// read floor: sum of all values in f32 registers
void readonly(){
 #pragma omp parallel for schedule(static)
 for(int t=0;t<N/TASK;t++){ __m512 s0=_mm512_setzero_ps(),s1=s0,s2=s0,s3=s0; const float*p=x+(long)t*TASK*C;
   for(long i=0;i<(long)TASK*C;i+=64){ s0=_mm512_add_ps(s0,_mm512_load_ps(p+i)); s1=_mm512_add_ps(s1,_mm512_load_ps(p+i+16)); s2=_mm512_add_ps(s2,_mm512_load_ps(p+i+32)); s3=_mm512_add_ps(s3,_mm512_load_ps(p+i+48)); }
   if(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0,s1),_mm512_add_ps(s2,s3)))==1.2345f) sink+=1; }
}
// the statistics, rows in groups of G, the sums in memory (bnorm before: G = 4; now 8)
#define QUADS(NAME,G) void NAME(){ \
 _Pragma("omp parallel for schedule(static)") \
 for(int t=0;t<N/TASK;t++){ int me=omp_get_thread_num(); double*s1=acc1[me],*s2=acc2[me]; const float*p=x+(long)t*TASK*C; \
   for(int r=0;r<TASK;r+=G) for(int j=0;j<C;j+=8){ __m512d sh=_mm512_load_pd(shift+j), a=_mm512_setzero_pd(), b=a; \
     for(int q=0;q<G;q++){ __m512d d=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_load_ps(p+(long)(r+q)*C+j)),sh); a=_mm512_add_pd(a,d); b=_mm512_add_pd(b,_mm512_mul_pd(d,d)); } \
     _mm512_store_pd(s1+j,_mm512_add_pd(_mm512_load_pd(s1+j),a)); _mm512_store_pd(s2+j,_mm512_add_pd(_mm512_load_pd(s2+j),b)); } } }
QUADS(g4,4) QUADS(g8,8)
#define DOTS(NAME,G) void NAME(){ \
 _Pragma("omp parallel for schedule(static)") \
 for(int t=0;t<N/TASK;t++){ int me=omp_get_thread_num(); double*s1=acc1[me],*s2=acc2[me]; const float*p=x+(long)t*TASK*C,*pd=dyv+(long)t*TASK*C; \
   for(int r=0;r<TASK;r+=G) for(int j=0;j<C;j+=8){ __m512d m=_mm512_load_pd(shift+j), a=_mm512_setzero_pd(), b=a; \
     for(int q=0;q<G;q++){ long i=(long)(r+q)*C+j; __m512d e=_mm512_cvtps_pd(_mm256_load_ps(pd+i)); __m512d d=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_load_ps(p+i)),m); a=_mm512_add_pd(a,e); b=_mm512_add_pd(b,_mm512_mul_pd(e,d)); } \
     _mm512_store_pd(s1+j,_mm512_add_pd(_mm512_load_pd(s1+j),a)); _mm512_store_pd(s2+j,_mm512_add_pd(_mm512_load_pd(s2+j),b)); } } }
DOTS(d4,4) DOTS(d8,8)
void readonly2(){
 #pragma omp parallel for schedule(static)
 for(int t=0;t<N/TASK;t++){ __m512 s0=_mm512_setzero_ps(),s1=s0,s2=s0,s3=s0; const float*p=x+(long)t*TASK*C,*pd=dyv+(long)t*TASK*C;
   for(long i=0;i<(long)TASK*C;i+=32){ s0=_mm512_add_ps(s0,_mm512_load_ps(p+i)); s1=_mm512_add_ps(s1,_mm512_load_ps(p+i+16)); s2=_mm512_add_ps(s2,_mm512_load_ps(pd+i)); s3=_mm512_add_ps(s3,_mm512_load_ps(pd+i+16)); }
   if(_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0,s1),_mm512_add_ps(s2,s3)))==1.2345f) sink+=1; }
}
typedef void(*fn)();
int main(int argc,char**argv){
 long big=64l<<20; float*f1=aligned_alloc(64,big),*f2=aligned_alloc(64,big); memset(f1,1,big);memset(f2,0,big);
 x=aligned_alloc(64,(long)N*C*4); for(long i=0;i<(long)N*C;i++) x[i]=(i%97)*0.1f+3; fa=aligned_alloc(64,8*C*4); dyv=aligned_alloc(64,(long)N*C*4); for(long i=0;i<(long)N*C;i++) dyv[i]=(i%13)*0.2f-1; fb=aligned_alloc(64,8*C*4);
 for(int j=0;j<C;j++) shift[j]=3.0;
 fn f[]={readonly,g4,g8,readonly2,d4,d8}; const char*nm[]={"read-only","f64 4 rows","f64 8 rows","read x,dy","dot 4 rows","dot 8 rows"}; int nv=6;
 int R=30; double *ts=malloc(sizeof(double)*R*nv);
 for(int r=0;r<R;r++) for(int v=0;v<nv;v++){ 
   #pragma omp parallel for
   for(long c=0;c<16;c++) memcpy((char*)f2+c*(big/16),(char*)f1+c*(big/16),big/16);
   double t=now(); f[v](); ts[v*R+r]=now()-t; }
 for(int v=0;v<nv;v++){ double*a=ts+v*R; for(int i=0;i<R;i++)for(int j=i+1;j<R;j++) if(a[j]<a[i]){double q=a[i];a[i]=a[j];a[j]=q;}
   printf("%-12s median %.3f ms  min %.3f  (%.1f GB/s)\n",nm[v],a[R/2]*1e3,a[0]*1e3,(double)N*C*4*(v>=3?2:1)/a[R/2]/1e9); }
}
